"""Graceful drain on SIGTERM: the tier turns NOT_SERVING, new work gets UNAVAILABLE (or, for the
scheduler, stays in Redis for the next one), a generation already running finishes, and the
process exits 0 within its grace period. Fake engine with slow steps, so that each generation
lasts a few seconds: long enough to watch the UNAVAILABLE window while it runs."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import redis
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import streams
from services.common.proto import Stub, pb
from services.common.redis_server import find_redis_server, free_port
from tests.integration.svc_stack import INTERNAL_TOKEN, ROOT, child_env, internal_channel, wait_for
from tests.integration.test_services_stack import echo, texts

pytestmark = pytest.mark.timeout(120)
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Background:
    """A Generate stream consumed in a thread; `chunks` fills as they come."""

    def __init__(self, stub, text: str, max_tokens: int):
        self.chunks: list = []
        self.error: grpc.RpcError | None = None
        req = pb.GenerateRequest(text=text, sampling=pb.SamplingParams(max_tokens=max_tokens))
        self._call = stub.Generate(req, timeout=60)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for chunk in self._call:
                self.chunks.append(chunk)
        except grpc.RpcError as exc:
            self.error = exc

    def result(self, timeout: float = 30.0) -> list:
        self.thread.join(timeout)
        assert not self.thread.is_alive() and self.error is None, self.error
        return self.chunks


def health(channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status


def unavailable(call) -> str:
    """Runs `call`, which must fail with UNAVAILABLE; returns the details."""
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        list(result) if hasattr(result, "__iter__") else result
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    return err.value.details()


def test_serve_all_drains_on_sigterm(tmp_path):
    """`taxiway serve` (four tier processes): SIGTERM mid-generation lets it finish, refuses new
    requests with UNAVAILABLE meanwhile, then every tier exits and the parent exits 0."""
    if find_redis_server() is None:
        pytest.skip("no redis-server binary for the embedded Redis")
    port, grace = free_port(), 20.0
    config = tmp_path / "taxiway.yaml"
    config.write_text(yaml.safe_dump({
        "fake_engine": True, "metrics_port": 0, "openai_port": 0, "drain_timeout_s": grace,
        "tokenizer": {"port": 0}, "scheduler": {"port": 0, "heartbeat_timeout_s": 2.0},
        "executor": {"port": 0, "fake_step_s": 0.04}}))
    proc = subprocess.Popen([sys.executable, "-m", "services.serve", "--config", str(config),
                             "--port", str(port)], cwd=ROOT, env=_clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = _pump(proc)
    try:
        wait_for(lambda: any("taxiway is serving at" in l for l in lines), 90, "taxiway serve")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = Stub(channel, "Gateway")
        running = Background(stub, "drain me", max_tokens=100)  # ~4 s of steps
        wait_for(lambda: running.chunks, 20, "the first chunk")
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: health(channel) == NOT_SERVING, 5, "NOT_SERVING")
        details = unavailable(lambda: stub.GenerateOnce(pb.GenerateRequest(
            text="too late", sampling=pb.SamplingParams(max_tokens=4)), timeout=5))
        assert "draining" in details
        assert running.thread.is_alive()  # refused while the first one still streams
        chunks = running.result()
        assert texts(chunks) == echo("drain me", 100)
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        rc = proc.wait(grace)
        assert rc == 0 and time.monotonic() - signalled < grace, "".join(lines)
        assert any("taxiway: stopped" in l for l in lines)
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_executor_process_drains_on_sigterm(stack_factory):
    """`taxiway serve --role executor`: SIGTERM while it decodes. Admit is refused, the scheduler
    queues new work for another executor, the running request finishes there, exit 0."""
    stack = stack_factory(executors=0)
    proc = stack.spawn_executor("drainee", fake_step_s=0.04)
    stack.wait_executors(1)
    address = streams.list_executors(redis.Redis.from_url(stack.redis_url))["drainee"]["address"]
    executor = internal_channel(address)
    running = Background(stack.stub, "keep going", max_tokens=80)
    wait_for(lambda: running.chunks, 20, "the first chunk")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: health(executor) == NOT_SERVING, 5, "NOT_SERVING")
    details = unavailable(lambda: Stub(executor, "Executor").Admit(pb.AdmitRequest(), timeout=5))
    assert details == "executor is draining"
    later = Background(stack.stub, "next", max_tokens=4)
    wait_for(lambda: stack.state().num_waiting == 1, 5, "the new request to wait")
    assert running.thread.is_alive() and later.thread.is_alive()
    stack.add_executor()
    assert texts(later.result()) == echo("next", 4)
    assert texts(running.result()) == echo("keep going", 80)
    assert proc.wait(20) == 0
    executor.close()


def test_tokenizer_drain_lets_open_streams_finish(stack_factory):
    stack = stack_factory(fake_step_s=0.03)
    running = Background(stack.stub, "detokenize me", max_tokens=60)
    wait_for(lambda: running.chunks, 20, "the first chunk")  # its Detokenize stream is open
    drained: list[bool] = []
    drain = threading.Thread(target=lambda: drained.append(stack.tokenizer.drain(20)))
    drain.start()
    tok = internal_channel(f"127.0.0.1:{stack.tokenizer.port}")
    wait_for(lambda: health(tok) == NOT_SERVING, 5, "NOT_SERVING")
    request = pb.TokenizeRequest(text="x")
    assert unavailable(lambda: Stub(tok, "Tokenizer").Tokenize(request, timeout=5)) == \
        "tokenizer is draining"
    # the gateway's channel skips tokenizers that are not SERVING: here there is no other one
    assert "tokenizer tier" in unavailable(lambda: stack.generate("new", max_tokens=2))
    assert running.thread.is_alive()
    assert texts(running.result()) == echo("detokenize me", 60)
    drain.join(10)
    assert drained == [True]
    tok.close()


def test_gateway_skips_a_draining_tokenizer_replica():
    """Two tokenizers behind one target: while one drains, every call goes to the other."""
    from services.common.aio import LoopThread
    from services.gateway.clients import GrpcTokenizerClient
    from services.tokenizer.config import TokenizerConfig
    from services.tokenizer.service import build

    config = TokenizerConfig(port=0, metrics_port=0, fake_engine=True, internal_token=INTERNAL_TOKEN)
    first, second = build(config), build(config)
    loop = LoopThread("test-client")

    async def connect():
        return GrpcTokenizerClient(f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}",
                                   credential=INTERNAL_TOKEN)

    client = loop.run(connect())
    tokenize = lambda text: loop.run(client.tokenize(text))  # noqa: E731
    try:
        assert tokenize("ab")[0] == [1, ord("a") + 3, ord("b") + 3]
        assert first.drain(5.0)
        wait_for(lambda: _only_second_answers(tokenize, first), 10, "calls to go to the other one")
        for _ in range(6):
            assert tokenize("ab")[0] == [1, ord("a") + 3, ord("b") + 3]
        assert first.gate.busy == 0
    finally:
        loop.run(client.close())
        loop.stop()
        first.stop()
        second.stop()


def test_a_draining_tokenizer_keeps_its_sessions_and_new_ones_start_elsewhere():
    """The gateway's one DetokenizeMany stream sits on the replica that drains: the session it holds
    runs to its end there; a new session is refused there (UNAVAILABLE) and starts on the other
    replica; once no session is left the stream ends and the drain completes."""
    from services.common.aio import LoopThread
    from services.gateway.clients import GrpcTokenizerClient
    from services.tokenizer.config import TokenizerConfig
    from services.tokenizer.service import build

    config = TokenizerConfig(port=0, metrics_port=0, fake_engine=True, internal_token=INTERNAL_TOKEN)
    tiers = build(config), build(config)
    loop = LoopThread("test-client")
    ids = lambda text: [b + 3 for b in text.encode()]  # noqa: E731 - the byte tokenizer's ids

    def served(tier) -> float:
        return tier.obs.registry.get_sample_value(
            "taxiway:tokenizer_request_seconds_count", {"model_name": "fake-bytes", "method": "Detokenize"}) or 0

    async def connect():
        return GrpcTokenizerClient(f"ipv4:127.0.0.1:{tiers[0].port},127.0.0.1:{tiers[1].port}",
                                   credential=INTERNAL_TOKEN)

    async def session():
        return await client.detokenizer([1], skip_special_tokens=True, stop=(), include_stop_str_in_output=False)

    client = loop.run(connect())
    try:
        old = loop.run(session())
        assert loop.run(old.add(ids("held "))) == ("held ", None)
        draining, other = tiers if served(tiers[0]) else tiers[::-1]
        drained: list[bool] = []
        drain = threading.Thread(target=lambda: drained.append(draining.drain(20)))
        drain.start()
        wait_for(lambda: not draining.gate.is_open, 5, "the drain to start")
        new = loop.run(session())
        before = served(other)
        assert loop.run(new.add(ids("elsewhere"), flush=True)) == ("elsewhere", None)
        assert served(other) == before + 1 and new.reopened == 1
        assert loop.run(old.add(ids("to the end"), flush=True)) == ("to the end", None)
        drain.join(10)
        assert drained == [True] and draining.gate.busy == 0
    finally:
        loop.run(client.close())
        loop.stop()
        for tier in tiers:
            tier.stop()


def _only_second_answers(tokenize, first) -> bool:
    before = first.obs.registry.get_sample_value(
        "taxiway:tokenizer_request_seconds_count", {"model_name": "fake-bytes", "method": "Tokenize"})
    tokenize("x")
    return before == first.obs.registry.get_sample_value(
        "taxiway:tokenizer_request_seconds_count", {"model_name": "fake-bytes", "method": "Tokenize"})


def test_scheduler_drain_finishes_its_requests_and_leaves_new_ones_in_redis(stack_factory):
    stack = stack_factory(fake_step_s=0.03)
    running = Background(stack.stub, "scheduled", max_tokens=60)
    wait_for(lambda: running.chunks, 20, "the first chunk")
    old = stack.scheduler
    drained: list[bool] = []
    drain = threading.Thread(target=lambda: drained.append(old.drain(20)))
    drain.start()
    wait_for(lambda: health(stack.scheduler_channel) == NOT_SERVING, 5, "NOT_SERVING")
    term = old.term
    wait_for(lambda: not any(t.name == "request-reader" and t.is_alive() for t in term.threads),
             5, "the request reader to stop")
    later = Background(stack.stub, "for the next scheduler", max_tokens=5)
    assert texts(running.result()) == echo("scheduled", 60)
    drain.join(10)
    assert drained == [True] and later.thread.is_alive()  # its entry waits in Redis
    old.stop()
    stack.scheduler_channel.close()
    stack.start_scheduler()  # a successor reads the entry the draining one left
    assert texts(later.result()) == echo("for the next scheduler", 5)


def _clean_env() -> dict:
    return child_env()


def _pump(proc) -> list[str]:
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines
