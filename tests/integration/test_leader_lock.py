"""The scheduler's leader lock against a real Redis: acquire, renew, lose, compare-and-delete, the
fence's clock, and the claim of a former leader's unacknowledged entries."""

from __future__ import annotations

import pytest
import redis

from services.common import streams
from services.scheduler.leader import LeaderLock
from tests.integration.svc_stack import wait_for

pytestmark = pytest.mark.timeout(30)
KEY = "taxiway:test:leader"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


def lock(r, owner: str, ttl_s: float = 5.0, **kwargs) -> LeaderLock:
    return LeaderLock(r, owner, ttl_s=ttl_s, key=KEY, **kwargs)


def test_one_holder_at_a_time(r):
    a, b = lock(r, "a"), lock(r, "b")
    assert a.acquire() and a.holder == "a"
    assert not b.acquire() and b.holder == "a"
    assert r.get(KEY) == b"a" and 4000 < r.pttl(KEY) <= 5000
    assert a.acquire()  # already ours (a restart with the same id): still ours, extended
    assert not b.renew() and r.get(KEY) == b"a"  # b never held it
    assert a.current_holder() == b.current_holder() == "a"


def test_renew_extends_only_our_own_lock(r):
    a = lock(r, "a")
    assert a.acquire()
    r.pexpire(KEY, 100)
    assert a.renew() and r.pttl(KEY) > 4000
    r.set(KEY, "b", px=5000)  # a's expired and b took it
    assert not a.renew() and not a.valid
    assert r.get(KEY) == b"b" and r.pttl(KEY) <= 5000


def test_release_deletes_only_our_own_lock(r):
    a, b = lock(r, "a"), lock(r, "b")
    assert a.acquire()
    assert not b.release() and r.get(KEY) == b"a"
    assert a.release() and r.get(KEY) is None and not a.valid
    assert b.acquire() and not a.release() and r.get(KEY) == b"b"


def test_an_expired_lock_goes_to_the_next(r):
    a, b = lock(r, "a", ttl_s=0.3), lock(r, "b", ttl_s=0.3)
    assert a.acquire() and not b.acquire()
    wait_for(b.acquire, 5, "the lock to expire and b to take it")
    assert not a.renew() and not a.acquire() and a.holder == "b"


def test_the_fence_ends_validity_before_the_key_can_expire(r):
    clock = Clock()
    a = lock(r, "a", ttl_s=4.0, clock=clock)
    assert a.fence_margin_s == 1.0 and not a.valid
    assert a.acquire() and a.valid and a.remaining_s == 3.0
    clock.now += 2.9
    assert a.valid
    clock.now += 0.2  # 3.1 s after the acquire began: no act from now on, though the key lives
    assert not a.valid and a.remaining_s == 0.0
    assert a.renew() and a.remaining_s == 3.0  # a renewal counts from its own start
    assert a.release()


def test_a_failed_renewal_leaves_the_validity_to_run_out(r, redis_url):
    clock = Clock()
    client = streams.connect(redis_url, retries=0)
    a = lock(client, "a", ttl_s=4.0, clock=clock)
    assert a.acquire()
    clock.now += 1.0
    # a partition: Redis is unreachable from now on
    client.connection_pool = streams.connect("redis://127.0.0.1:1/0", retries=0).connection_pool
    with pytest.raises(redis.ConnectionError):
        a.renew()
    assert a.valid and a.remaining_s == 2.0  # still the acquire's validity, running out
    clock.now += 2.0
    assert not a.valid and r.get(KEY) == b"a"  # it stops acting while the key still lives


def test_bad_margin():
    with pytest.raises(ValueError, match="fence_margin_s"):
        LeaderLock(redis.Redis(), "a", ttl_s=1.0, fence_margin_s=1.0)


def test_claim_pending_takes_every_other_consumers_entries_and_forgets_them(r):
    streams.ensure_group(r)
    ids = [r.xadd(streams.REQUESTS_STREAM, {streams.FIELD: f"m{i}"}) for i in range(5)]
    r.xreadgroup(streams.SCHEDULER_GROUP, "old", {streams.REQUESTS_STREAM: ">"}, count=3)
    r.xreadgroup(streams.SCHEDULER_GROUP, "new", {streams.REQUESTS_STREAM: ">"}, count=1)
    r.xreadgroup(streams.SCHEDULER_GROUP, "older", {streams.REQUESTS_STREAM: ">"}, count=1)
    r.xack(streams.REQUESTS_STREAM, streams.SCHEDULER_GROUP, ids[4])  # older's: nothing pending
    assert streams.claim_pending(r, "new", 60_000) == []  # none idle a minute
    got = streams.claim_pending(r, "new", 0, forget=True, batch=2)
    assert [e[0] for e in got] == ids[:3] and got[0][1] == {streams.FIELD: b"m0"}
    consumers = {c["name"]: c["pending"] for c in
                 r.xinfo_consumers(streams.REQUESTS_STREAM, streams.SCHEDULER_GROUP)}
    assert consumers == {b"new": 4}
