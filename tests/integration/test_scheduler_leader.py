"""Two schedulers, one leader lock (real Redis, real gRPC, the fake engine): only the leader admits;
a standby serves health and GetState; it takes over from a leader that was killed, or that cannot
renew its lock, and every request, before and after, is admitted once and answered exactly."""

from __future__ import annotations

import collections
import socket
import threading
import time

import pytest
import redis
from grpc_health.v1 import health_pb2

from services.common import streams
from services.common.proto import Stub, pb
from services.scheduler.service import SchedulerService
from tests.integration.svc_stack import Stack, internal_channel, wait_for
from tests.integration.test_drain import Background, health
from tests.integration.test_services_stack import echo, texts

pytestmark = pytest.mark.timeout(60)
TTL = 1.5
SERVING = health_pb2.HealthCheckResponse.SERVING


def state(scheduler: SchedulerService):
    with internal_channel(scheduler.server.address) as channel:
        return Stub(channel, "Scheduler").GetState(pb.GetSchedulerStateRequest(), timeout=5)


def record_admits(executor) -> collections.Counter:
    """Request ids the executor is asked to admit, counted."""
    admits: collections.Counter = collections.Counter()
    admit = executor.core.admit

    def counting(request, admit_seq=0):
        admits[request.request_id] += 1
        admit(request, admit_seq)

    executor.core.admit = counting
    return admits


def admitted_by(scheduler: SchedulerService) -> float:
    value = scheduler.obs.registry.get_sample_value("taxiway:request_queue_time_seconds_count",
                                                    {"model_name": "fake-bytes"})
    return value or 0.0


def check(background: Background, text: str, n: int) -> None:
    chunks = background.result()
    assert texts(chunks) == echo(text, n)
    assert sum(len(c.token_ids) for c in chunks) == n
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH


def pending(r: redis.Redis) -> dict[bytes, int]:
    return {c["name"]: c["pending"]
            for c in r.xinfo_consumers(streams.REQUESTS_STREAM, streams.SCHEDULER_GROUP)}


def test_one_leads_the_standby_serves_admits_nothing_and_follows_a_drain(stack_factory):
    stack: Stack = stack_factory(fake_step_s=0.01, leader_ttl_s=TTL)
    leader = stack.scheduler
    standby = stack.add_scheduler("standby")
    lead, stand = state(leader), state(standby)
    assert (lead.is_leader, lead.scheduler_id, lead.leader_id) == (True, stack.scheduler_id,
                                                                   stack.scheduler_id)
    assert (stand.is_leader, stand.scheduler_id, stand.leader_id) == (False, "standby",
                                                                      stack.scheduler_id)
    assert stand.num_waiting == 0 and not stand.executors
    with internal_channel(standby.server.address) as channel:
        assert health(channel) == SERVING  # ready: the PodDisruptionBudget may drain its node
    gauge = "taxiway:scheduler_is_leader"
    assert (leader.obs.registry.get_sample_value(gauge),
            standby.obs.registry.get_sample_value(gauge)) == (1.0, 0.0)

    admits = record_admits(stack.executors[0])
    prompts = [f"only the leader admits {i}" for i in range(6)]
    calls = [Background(stack.stub, p, max_tokens=12) for p in prompts]
    for call, p in zip(calls, prompts):
        check(call, p, 12)
    assert len(admits) == 6 and set(admits.values()) == {1}
    assert admitted_by(leader) == 6 and admitted_by(standby) == 0
    r = redis.Redis.from_url(stack.redis_url)
    assert set(pending(r)) == {stack.scheduler_id.encode()}  # the standby never read the stream

    assert leader.drain(5)  # nothing runs: it hands the lock back at once
    wait_for(lambda: state(standby).is_leader, 5 * TTL, "the standby to lead after the drain")
    assert leader.obs.registry.get_sample_value(gauge) == 0.0
    check(Background(stack.stub, "after the handover", max_tokens=5), "after the handover", 5)
    assert admitted_by(standby) == 1 and admits.total() == 7


def test_standby_takes_over_from_a_killed_leader_mid_generation(stack_factory):
    """kill -9 of the leader (a child process) while A runs, B is about to end, C waits in its
    queue (the only executor drains); D comes after. The standby takes over once the lock
    expires: A is re-attached, B (ended meanwhile) acknowledged, C and D admitted, each once."""
    stack: Stack = stack_factory(scheduler=False, fake_step_s=0.02, leader_ttl_s=TTL)
    r = redis.Redis.from_url(stack.redis_url)
    first = stack.executors[0]
    admits = record_admits(first)
    doomed = stack.spawn_scheduler("doomed")
    wait_for(lambda: r.get(streams.SCHEDULER_LEADER_KEY) == b"doomed", 20, "the child to lead")
    standby = stack.add_scheduler("standby")
    assert not state(standby).is_leader

    a = Background(stack.stub, "A runs through the takeover", max_tokens=250)
    b = Background(stack.stub, "B ends while nobody leads", max_tokens=100)
    wait_for(lambda: a.chunks and b.chunks, 20, "A and B to stream")
    threading.Thread(target=first.drain, args=(30,), daemon=True).start()
    wait_for(lambda: first.core.board.read(None, 0)[0].draining, 5, "the executor to drain")
    c = Background(stack.stub, "C waits in the queue", max_tokens=10)
    wait_for(lambda: pending(r).get(b"doomed") == 3, 10, "the leader to read C")
    wait_for(lambda: sum(len(x.token_ids) for x in b.chunks) >= 92, 20, "B near its end")
    doomed.kill()
    killed = time.monotonic()
    d = Background(stack.stub, "D comes while nobody leads", max_tokens=10)
    second = stack.add_executor()
    admits_second = record_admits(second)

    wait_for(lambda: state(standby).is_leader, 3 * TTL + 5, "the standby to take over")
    took = time.monotonic() - killed
    b_ended = b.thread.is_alive() is False
    check(a, "A runs through the takeover", 250)
    check(b, "B ends while nobody leads", 100)
    check(c, "C waits in the queue", 10)
    check(d, "D comes while nobody leads", 10)
    assert b_ended, "B should have ended before the standby took over"
    assert took < TTL + 2.0, took
    assert sorted(admits.values()) == [1, 1] and sorted(admits_second.values()) == [1, 1]
    assert set(admits).isdisjoint(admits_second)
    wait_for(lambda: pending(r) == {b"standby": 0}, 10, "every entry acknowledged, doomed forgotten")


def test_a_leader_that_cannot_renew_stops_admitting_and_the_standby_takes_over(stack_factory):
    """The leader's lock connection goes into a black hole (its renewals hang until their timeout;
    the rest of it still reaches Redis): it stops admitting before its lock expires, though its
    lease thread is still stuck in a renewal, and the standby takes over only after that."""
    stack: Stack = stack_factory(fake_step_s=0.02, leader_ttl_s=TTL)
    old = stack.scheduler
    standby = stack.add_scheduler("standby")
    admits = record_admits(stack.executors[0])
    running = Background(stack.stub, "runs through the partition", max_tokens=200)
    wait_for(lambda: running.chunks, 20, "the first chunk")

    hole = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    cut = time.monotonic()
    old.lease_redis.connection_pool = streams.connect(
        f"redis://127.0.0.1:{hole.getsockname()[1]}/0", TTL / 4, retries=1).connection_pool
    fenced_at = None
    while not standby.lease.valid:  # never two valid leases
        if fenced_at is None and not old.lease.valid:
            fenced_at = time.monotonic()
            admitted_when_fenced = admitted_by(old)
            late = Background(stack.stub, "sent once the old leader is fenced", max_tokens=10)
        assert time.monotonic() - cut < 3 * TTL + 5, "no takeover"
        time.sleep(0.005)
    took_over = time.monotonic()
    assert fenced_at is not None and fenced_at - cut <= TTL * 0.75 + 0.3
    assert took_over > fenced_at
    wait_for(lambda: old.term is None, 5, "the old leader to step down")
    assert not state(old).is_leader and state(standby).is_leader

    after = Background(stack.stub, "sent after the takeover", max_tokens=10)
    check(running, "runs through the partition", 200)
    check(late, "sent once the old leader is fenced", 10)
    check(after, "sent after the takeover", 10)
    assert admitted_by(old) == admitted_when_fenced == 1
    assert admitted_by(standby) == 2  # the running request was re-attached, not admitted again
    assert len(admits) == 3 and set(admits.values()) == {1}
    hole.close()
