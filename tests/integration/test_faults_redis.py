"""The fault suite, Redis (issue 8, finding 2): a private redis-server with a password is killed
mid-stream and started again on the same port, empty (no persistence) or from its AOF. Streams
that were running and one that waited in the scheduler's queue all finish exactly, and new
requests are served. Before, the consumer group was gone for good (NOGROUP every second) and
every request ended DEADLINE_EXCEEDED while every tier said SERVING."""

from __future__ import annotations

import secrets
import threading
import time

import pytest

from services.common.redis_server import EmbeddedRedis, find_redis_server
from services.executor.fake import FakeEngine
from tests.integration.faults import Stream, lost_and_duplicated, recovery_s
from tests.integration.svc_stack import Stack, wait_for
from tests.integration.test_services_stack import echo, texts

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


@pytest.fixture
def private_redis(request):
    if find_redis_server() is None:
        pytest.skip("no redis-server binary")
    server = EmbeddedRedis(password=secrets.token_hex(8), appendonly=request.param)
    yield server
    server.stop()


@pytest.mark.parametrize("private_redis", [False, True], ids=["empty", "aof"], indirect=True)
def test_redis_restart_mid_stream_loses_nothing(private_redis, fault_report):
    stack = Stack(private_redis.url, executors=0, redis_password=private_redis.password).start()
    try:
        stack.add_executor(engine=FakeEngine(max_num_seqs=2, step_delay_s=0.02))
        stack.wait_executors(1)
        prompts = [f"stream {i} through a Redis restart" for i in range(3)]
        streams = [Stream.text(stack.stub, p, 120) for p in prompts]
        wait_for(lambda: sum(len(s.chunks) >= 10 for s in streams) == 2, 20, "two running streams")
        running = [s for s in streams if s.chunks]
        assert len(running) == 2 and stack.state().num_waiting == 1  # the third waits
        fault_at = time.monotonic()
        private_redis.restart()
        for s, p in zip(streams, prompts):
            assert texts(s.result(60)) == echo(p, 120)
        recover = recovery_s(running, fault_at)
        results: dict[int, str] = {}

        def one(i: int) -> None:
            results[i] = texts(stack.generate(f"after the restart {i}", max_tokens=8))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == {i: echo(f"after the restart {i}", 8) for i in range(10)}
        stack.wait_idle(15)
        lost = dup = 0
        for s, p in zip(streams, prompts):
            a, b = lost_and_duplicated(echo(p, 120), s.output)
            lost, dup = lost + a, dup + b
        kind = "with AOF" if private_redis.appendonly else "empty (no persistence)"
        fault_report(fault=f"Redis killed and restarted {kind}", streams=3, lost=lost,
                     duplicated=dup, recover_s=recover,
                     note="2 running + 1 queued exact; 10/10 new requests served")
    finally:
        stack.stop()
