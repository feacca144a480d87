"""The whole stack over real gRPC and a real Redis, with the fake engine (fast, deterministic):
the fake echoes the prompt's bytes, so every expected answer is known exactly."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from services.common.proto import pb
from tests.integration.svc_stack import wait_for

pytestmark = pytest.mark.timeout(120)


def echo(text: str, n: int) -> str:
    """What the fake engine answers to `text` with max_tokens=n (n bytes of the prompt, cycled)."""
    data = text.encode()
    return bytes(data[i % len(data)] for i in range(n)).decode()


def texts(chunks) -> str:
    return "".join(c.text for c in chunks)


def test_stream_through_the_stack_matches_the_engine(stack_factory):
    stack = stack_factory()
    chunks = stack.generate("Hello, taxiway!", max_tokens=20, temperature=0)
    assert texts(chunks) == echo("Hello, taxiway!", 20)
    assert [t for c in chunks for t in c.token_ids] == [b + 3 for b in b"Hello, taxiway!Hello"]
    last = chunks[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (16, 20)  # BOS + 15 bytes
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    once = stack.stub.GenerateOnce(pb.GenerateRequest(
        text="Hello, taxiway!", sampling=pb.SamplingParams(max_tokens=20, temperature=0)), timeout=30)
    assert once.text == texts(chunks) and once.finish_reason == pb.FINISH_REASON_LENGTH


def test_tokenize_model_info_health_and_reflection(stack_factory):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stack = stack_factory()
    tok = stack.stub.Tokenize(pb.TokenizeRequest(text="hé", add_special_tokens=True), timeout=5)
    assert list(tok.token_ids) == [1, ord("h") + 3, 0xC3 + 3, 0xA9 + 3]
    info = stack.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert (info.name, info.vocab_size, list(info.eos_token_ids)) == ("fake-bytes", 259, [2])
    refl = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
    reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]), timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert {"taxiway.v1.Gateway", "grpc.health.v1.Health"} <= names


def test_chat_messages_go_through_the_template(stack_factory):
    stack = stack_factory()
    req = pb.GenerateRequest(messages=pb.ChatMessages(messages=[
        pb.ChatMessage(role="user", content="hi")]), sampling=pb.SamplingParams(max_tokens=9))
    out = list(stack.stub.Generate(req, timeout=30))
    assert texts(out) == "<|user|>h"


def test_utf8_streaming_is_exact(stack_factory):
    stack = stack_factory()
    text = "héllo wörld 😀 中文 🇫🇷!"
    n = len(text.encode())
    chunks = stack.generate(text, max_tokens=n)
    assert texts(chunks) == text
    assert all("\ufffd" not in c.text for c in chunks)
    assert sum(len(c.token_ids) for c in chunks) == n


def test_stop_string_split_across_tokens(stack_factory):
    stack = stack_factory()
    chunks = stack.generate("ab😀cd", max_tokens=50, stop=["😀c"])
    assert texts(chunks) == "ab"
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert chunks[-1].stop_reason == "😀c"
    stack.wait_idle()  # the executor was told to abort: nothing left running


def test_two_executors_share_a_load(stack_factory):
    stack = stack_factory(executors=2, fake_step_s=0.02)
    results: dict[int, str] = {}

    def one(i: int) -> None:  # prompts differ from their first token: no prefix affinity
        results[i] = texts(stack.generate(f"{i} is this request's number", max_tokens=16))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: echo(f"{i} is this request's number", 16) for i in range(8)}
    admitted = sorted(e.num_admitted for e in stack.state().executors)
    assert len(admitted) == 2 and admitted[0] >= 2, admitted


def test_cancellation_frees_blocks(stack_factory):
    stack = stack_factory(fake_step_s=0.01)
    idle = stack.state().executors[0].num_free_blocks
    call = stack.stub.Generate(pb.GenerateRequest(
        text="a long answer " * 8, sampling=pb.SamplingParams(max_tokens=3000)), timeout=60)
    for _ in range(3):
        next(call)
    busy = stack.state().executors[0]
    assert busy.num_requests == 1
    wait_for(lambda: stack.state().executors[0].num_free_blocks < idle, 5, "blocks in use")
    call.cancel()
    stack.wait_idle(10)
    assert stack.state().executors[0].num_free_blocks == idle


def test_deadline_gives_deadline_exceeded_and_frees_blocks(stack_factory):
    stack = stack_factory(fake_step_s=0.01)
    with pytest.raises(grpc.RpcError) as err:
        stack.generate("slow", max_tokens=3000, timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stack.wait_idle(10)


def test_queue_overflow_gives_resource_exhausted(stack_factory):
    stack = stack_factory(executors=0, max_waiting=2)
    calls = [stack.stub.Generate(pb.GenerateRequest(text=f"wait {i}"), timeout=60) for i in range(2)]
    wait_for(lambda: stack.state().num_waiting == 2, 10, "two waiting requests")
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stack.generate("one too many")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in err.value.details()
    assert time.monotonic() - start < 5
    for c in calls:
        c.cancel()
    wait_for(lambda: stack.state().num_waiting == 0, 10, "the cancelled requests to leave the queue")


@pytest.mark.parametrize("request_kwargs, sampling, message", [
    ({"text": ""}, {}, "prompt is empty"),
    ({}, {}, "no prompt"),
    ({"text": "hi"}, {"temperature": -1.0}, "temperature must be >= 0"),
    ({"text": "hi"}, {"top_p": 2.0}, "top_p must be in (0, 1]"),
    ({"text": "hi"}, {"max_tokens": 0}, "max_tokens must be at least 1"),
    ({"text": "hi"}, {"max_tokens": 5000}, "exceeds the context length"),
    ({"token_ids": pb.TokenIds(ids=[5, 100000])}, {}, "token id 100000 is out of range"),
    ({"messages": pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="x")])}, {},
     "unknown chat role"),
])
def test_bad_inputs_give_invalid_argument(stack_factory, request_kwargs, sampling, message):
    stack = stack_factory()
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling), **request_kwargs)
    with pytest.raises(grpc.RpcError) as err:
        list(stack.stub.Generate(req, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_killed_executor_yields_a_complete_duplicate_free_answer(stack_factory):
    stack = stack_factory(executors=0)
    victim = stack.spawn_executor("victim", fake_step_s=0.05)
    stack.wait_executors(1)
    prompt, n = "resume me exactly, no gap and no duplicate", 60
    call = stack.stub.Generate(pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(
        max_tokens=n)), timeout=60)
    chunks = [next(call) for _ in range(5)]
    stack.add_executor()  # the survivor
    stack.wait_executors(2)
    victim.kill()
    chunks += list(call)
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == n
    assert texts(chunks) == echo(prompt, n)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == n
    survivor = [e for e in stack.state().executors if e.executor_id != "victim"]
    assert survivor[0].num_admitted == 1


def test_restarted_scheduler_reads_unacknowledged_requests_again(stack_factory):
    stack = stack_factory(executors=0)
    call = stack.stub.Generate(pb.GenerateRequest(text="survive a restart",
                                                  sampling=pb.SamplingParams(max_tokens=8)), timeout=60)
    wait_for(lambda: stack.state().num_waiting == 1, 10, "the request to wait")
    stack.stop_scheduler()
    stack.start_scheduler()  # same consumer name: re-reads what it had not acknowledged
    wait_for(lambda: stack.state().num_waiting == 1, 10, "the request to be read again")
    later = stack.stub.Generate(pb.GenerateRequest(text="and a new one",
                                                   sampling=pb.SamplingParams(max_tokens=5)), timeout=60)
    wait_for(lambda: stack.state().num_waiting == 2, 10, "new requests to be read after the old")
    stack.add_executor()
    assert texts(list(call)) == echo("survive a restart", 8)
    assert texts(list(later)) == echo("and a new one", 5)
