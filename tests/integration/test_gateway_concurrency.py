"""One gateway replica (its own process, `--role gateway`) holds 4,096 concurrent Generate streams
on grpc.aio with bounded memory (its RSS measured), refuses the next one at once with
RESOURCE_EXHAUSTED naming max_concurrent_requests, and the scheduler's queue bound answers
RESOURCE_EXHAUSTED at once; then every stream completes with the fake engine's exact answer, and
a second wave leaves the RSS where the first left it (nothing kept per request)."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

import grpc
import pytest

from services.common.proto import Stub, pb
from services.common.redis_server import free_port
from services.executor.fake import FakeEngine
from tests.integration.svc_stack import Stack

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
STREAMS = 4096
SECOND_WAVE = 1024
OSL = 4


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def prompt(i: int) -> list[int]:
    """Four byte tokens (the fake engine echoes them): each request's answer is its own."""
    return [3 + 65 + (i >> (6 * k)) % 26 for k in range(4)]


async def open_streams(address: str, n: int, offset: int = 0):
    """n Generate calls, all started; returns (channel, calls) without reading them."""
    channel = grpc.aio.insecure_channel(address)
    stub = Stub(channel, "Gateway")
    sampling = pb.SamplingParams(max_tokens=OSL, temperature=0)
    calls = [stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt(offset + i)),
                                              sampling=sampling), timeout=240)
             for i in range(n)]
    return channel, calls


async def read_all(calls) -> list[list[int]]:
    async def one(call):
        return [t async for chunk in call for t in chunk.token_ids]

    return await asyncio.gather(*(one(c) for c in calls))


async def refused(address: str) -> tuple[grpc.StatusCode, str, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        t0 = time.monotonic()
        try:
            async for _ in Stub(channel, "Gateway").Generate(pb.GenerateRequest(
                    text="one too many", sampling=pb.SamplingParams(max_tokens=2)), timeout=30):
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details(), time.monotonic() - t0
    raise AssertionError("the request was not refused")


def test_one_gateway_holds_4096_streams(redis_url):
    stack = Stack(redis_url, executors=0, max_waiting=STREAMS)
    proc = None
    try:
        stack.start()
        port = free_port()
        proc = stack._spawn([
            sys.executable, "-m", "services.serve", "--role", "gateway", "--port", str(port),
            "--metrics-port", "0", "--openai-port", "-1", "--redis-url", redis_url,
            "--tokenizer-address", f"127.0.0.1:{stack.tokenizer.port}", "--allow-anonymous",
            "--gateway-id", f"gw-{uuid.uuid4().hex[:6]}", "--max-concurrent-requests", str(STREAMS)])
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as ch:
            stack.wait_serving(ch, 60)
        asyncio.run(_scenario(stack, proc.pid, address))
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        stack.stop()


async def _scenario(stack: Stack, pid: int, address: str) -> None:
    engine = FakeEngine(num_blocks=4 * STREAMS, max_num_seqs=1024, step_delay_s=0.002)
    warm_channel, warm = await open_streams(address, 8)
    stack.add_executor(engine=engine)
    assert all(len(t) == OSL for t in await read_all(warm))
    await warm_channel.close()
    stack.executors[0].stop()  # every stream of the wave waits in the scheduler's queue
    stack.executors.clear()
    baseline = rss_mb(pid)

    t0 = time.monotonic()
    channel, calls = await open_streams(address, STREAMS)
    await _until(lambda: stack.state().num_waiting == STREAMS, 120, "every stream to be queued")
    opened_s = time.monotonic() - t0
    held = rss_mb(pid)
    code, details, took = await refused(address)  # the gateway's own limit
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and took < 2.0, (code, details)
    assert f"max_concurrent_requests={STREAMS}" in details
    code, details, took = await refused(f"127.0.0.1:{stack.gateway.server.port}")  # queue bound
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and took < 2.0, (code, details)
    assert f"the queue is full ({STREAMS} requests waiting)" in details

    stack.add_executor(engine=engine)
    outputs = await read_all(calls)
    done_s = time.monotonic() - t0
    await channel.close()
    assert outputs == [prompt(i) for i in range(STREAMS)]  # each its own exact answer
    after_first = rss_mb(pid)

    channel, calls = await open_streams(address, SECOND_WAVE, offset=STREAMS)
    outputs = await read_all(calls)
    await channel.close()
    assert outputs == [prompt(STREAMS + i) for i in range(SECOND_WAVE)]
    after_second = rss_mb(pid)
    per_stream_kb = (held - baseline) * 1024 / STREAMS
    print(f"\n4096 streams: opened and queued in {opened_s:.1f}s, all done in {done_s:.1f}s; "
          f"gateway RSS {baseline:.0f} MB idle, {held:.0f} MB holding them "
          f"({per_stream_kb:.0f} KB per stream), {after_first:.0f} MB after, "
          f"{after_second:.0f} MB after a second wave of {SECOND_WAVE}")
    assert per_stream_kb < 64, per_stream_kb  # bounded: no thread or large buffer per stream
    assert after_second - after_first < 0.25 * max(held - baseline, 8), (after_first, after_second)


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.2)
