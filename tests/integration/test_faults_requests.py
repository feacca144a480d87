"""The fault suite, hostile requests and failing steps (issue 8, findings 1, 3 and 6): real gRPC,
real Redis, every tier in this process (executors also as child processes). Each test failed
before the fix it covers; each records its figures with `fault_report` (docs/reliability.md)."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.common.proto import Stub, pb
from services.executor.fake import FakeEngine
from services.tokenizer.fake import ByteTokenizer
from tests.integration.faults import Stream, lost_and_duplicated, recovery_s
from tests.integration.svc_stack import internal_channel, real_engine, wait_for
from tests.integration.test_drain import health
from tests.integration.test_services_stack import echo, texts

pytestmark = pytest.mark.timeout(120)
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        list(result) if hasattr(result, "__iter__") else result
    return err.value


def test_hostile_stop_token_ids_are_refused_and_service_goes_on(stack_factory, byte_llama,
                                                                fault_report):
    """Finding 1: stop_token_ids beyond the vocabulary crashed the sampler and, with it, the step
    loop for good. Now the gateway refuses it, the engine refuses it too when it comes straight
    to an executor, and the next greedy request is answered exactly."""
    from gpu_engine.llm import LLM
    from gpu_engine.sampling_params import SamplingParams

    tok = ByteTokenizer()
    want = LLM(model=byte_llama, device="cpu", dtype="float32").generate(
        [tok.encode("Hi")], SamplingParams(temperature=0.0, max_tokens=8))[0].outputs[0]
    stack = stack_factory(executors=0)
    executor = stack.add_executor(engine=real_engine(byte_llama))
    stack.wait_executors(1)
    hostile = pb.SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[1_000_000_000])
    err = rpc_error(lambda: stack.stub.Generate(pb.GenerateRequest(text="Hi", sampling=hostile),
                                                timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stop_token_ids: token id 1000000000 is out of range" in err.details()
    t0 = time.monotonic()
    request = pb.EngineRequest(request_id="hostile-direct", gateway_id="nobody",
                               prompt_token_ids=tok.encode("Hi"), sampling=hostile)
    with internal_channel(executor.server.address) as channel:  # past the gateway's checks
        Stub(channel, "Executor").Admit(pb.AdmitRequest(request=request), timeout=5)
    chunks = stack.generate("Hi", max_tokens=8, temperature=0.0)
    assert [t for c in chunks for t in c.token_ids] == list(want.token_ids)
    assert health(stack.channel) == SERVING and executor.core.broken is None
    lost, dup = lost_and_duplicated(want.token_ids, [t for c in chunks for t in c.token_ids])
    fault_report(fault="stop_token_ids 1e9 (gateway, and straight to an executor)", streams=1,
                 lost=lost, duplicated=dup, recover_s=round(time.monotonic() - t0, 2),
                 note="refused at both; the next greedy request exact")


BAD_SAMPLING = [
    ({"temperature": float("inf")}, "temperature must be a finite number, got inf"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number, got inf"),
    ({"top_p": float("nan")}, "top_p must be a finite number, got nan"),
    ({"stop": ["x"] * 17}, "at most 16 stop strings"),
    ({"stop": ["x" * 300]}, "at most 256 characters"),
]


def test_non_finite_and_oversized_parameters_are_invalid(stack_factory):
    """Finding 6: temperature +inf and repetition_penalty inf passed validation."""
    stack = stack_factory()
    for sampling, message in BAD_SAMPLING:
        err = rpc_error(lambda: stack.generate("hi", **sampling))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.details(), sampling
    long_id = pb.GenerateRequest(request_id="i" * 300, text="hi")
    err = rpc_error(lambda: stack.stub.Generate(long_id, timeout=10))
    assert "request_id may have at most 256 characters" in err.details()


def test_a_5_mb_prompt_gets_a_clean_limit_error(stack_factory, fault_report):
    """Finding 6: it got RESOURCE_EXHAUSTED with gRPC's own text from an internal channel."""
    stack = stack_factory()
    err = rpc_error(lambda: stack.generate("x" * 5_000_000, max_tokens=4))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details().startswith("the request is 5000") and "(max_request_bytes)" in err.details()
    assert "Received message larger than max" not in err.details()
    assert texts(stack.generate("still fine", max_tokens=4)) == echo("still fine", 4)
    fault_report(fault="5 MB prompt", streams=1, lost=0, duplicated=0, recover_s=0.0,
                 note="RESOURCE_EXHAUSTED naming max_request_bytes (4 MiB)")


def test_an_exception_in_a_step_fails_its_batch_and_the_executor_goes_on(stack_factory,
                                                                        fault_report):
    """A step that raises (injected: the executor's 5th engine step) fails the requests of its
    batch with INTERNAL, and only them; the request waiting in the engine runs after it, and so
    do new ones. Before, the step-loop thread died and everything hung to its deadline."""
    stack = stack_factory(executors=0, fake_step_s=0.02)
    executor = stack.add_executor(engine=FakeEngine(max_num_seqs=1, step_delay_s=0.02),
                                  fault_step_errors="5")
    stack.wait_executors(1)
    first = Stream.text(stack.stub, "in the failing batch", 40)
    wait_for(lambda: first.chunks, 10, "the first stream to start")
    second = Stream.text(stack.stub, "waits in the engine", 12)  # one sequence at a time
    first.wait(20)
    fault_at = first.times[-1] if first.times else time.monotonic()
    assert first.error.code() == grpc.StatusCode.INTERNAL
    assert "injected fault in engine step 5" in first.error.details()
    assert texts(second.result()) == echo("waits in the engine", 12)
    assert texts(stack.generate("and a new one", max_tokens=6)) == echo("and a new one", 6)
    assert executor.core.broken is None and health(stack.channel) == SERVING
    stack.wait_idle()
    lost, dup = lost_and_duplicated(echo("waits in the engine", 12), second.output)
    fault_report(fault="exception in one engine step", streams=2, lost=lost, duplicated=dup,
                 recover_s=recovery_s([second], fault_at),
                 note="its batch (1 stream) INTERNAL; the other stream exact")


def test_an_executor_that_cannot_go_on_leaves_and_its_requests_move(stack_factory, fault_report):
    """Steps that keep failing (max_step_failures of them): the executor turns NOT_SERVING and
    leaves the pool; the request of the failing batch gets INTERNAL, the ones it held but had not
    run yet resume on the other executor, exactly."""
    stack = stack_factory(executors=0, fake_step_s=0.02)
    broken = stack.add_executor(engine=FakeEngine(max_num_seqs=1, step_delay_s=0.02),
                                fault_step_errors="6", max_step_failures=1)
    stack.wait_executors(1)
    batch = Stream.text(stack.stub, "runs when it breaks", 40)
    wait_for(lambda: batch.chunks, 10, "the first stream to start")
    held = [Stream.text(stack.stub, f"held number {i}", 10) for i in range(2)]
    wait_for(lambda: stack.state().num_waiting == 0, 10, "both to be placed on it")
    stack.add_executor()  # the survivor
    batch.wait(20)
    fault_at = batch.times[-1]  # its last chunk came from the last step before the fault
    assert batch.error.code() == grpc.StatusCode.INTERNAL
    for i, s in enumerate(held):
        assert texts(s.result()) == echo(f"held number {i}", 10)
    assert broken.core.broken.startswith("1 engine steps failed in a row")
    with internal_channel(broken.server.address) as channel:
        assert health(channel) == NOT_SERVING
    assert [e.executor_id for e in stack.state().executors] == [stack.executors[1].executor_id]
    lost = dup = 0
    for i, s in enumerate(held):
        a, b = lost_and_duplicated(echo(f"held number {i}", 10), s.output)
        lost, dup = lost + a, dup + b
    fault_report(fault="engine steps keep failing (executor leaves)", streams=3, lost=lost,
                 duplicated=dup, recover_s=recovery_s(held, fault_at),
                 note="failing batch INTERNAL; 2 held streams resumed elsewhere, exact")


def test_reusing_a_request_id_after_a_stop_string(stack_factory, fault_report):
    """Finding 3: the old request's late tokens and its abort landed on the new one (INTERNAL
    "tokens 0..N never arrived", or another request's first token)."""
    stack = stack_factory(fake_step_s=0.005)
    bad = 0
    for i in range(6):
        first = list(stack.stub.Generate(pb.GenerateRequest(
            request_id="again", text="abc stop here", sampling=pb.SamplingParams(
                max_tokens=200, stop=["stop"])), timeout=30))
        assert texts(first) == "abc "
        again = list(stack.stub.Generate(pb.GenerateRequest(
            request_id="again", text=f"fresh {i}", sampling=pb.SamplingParams(max_tokens=9)),
            timeout=30))
        bad += texts(again) != echo(f"fresh {i}", 9)
    assert bad == 0
    stack.wait_idle()
    fault_report(fault="request_id reused right after a stop string (6 times)", streams=12,
                 lost=0, duplicated=0, recover_s=0.0, note="every second request exact")


def test_reusing_a_request_id_after_a_cancel(stack_factory):
    stack = stack_factory(fake_step_s=0.01)
    for i in range(4):
        old = Stream.text(stack.stub, "cancel me " * 4, 300, request_id="mine")
        wait_for(lambda: len(old.chunks) >= 2, 10, "the first chunks")
        old.cancel()
        new = list(stack.stub.Generate(pb.GenerateRequest(
            request_id="mine", text=f"new {i}", sampling=pb.SamplingParams(max_tokens=7)),
            timeout=30))
        assert texts(new) == echo(f"new {i}", 7)
    stack.wait_idle()


def test_request_ids_are_scoped_to_their_caller(stack_factory):
    """Two API keys: bob's "x" is his own while alice's "x" runs; "already in flight" is said to
    alice only, and never names what bob does."""
    stack = stack_factory(fake_step_s=0.01,
                          gateway_options={"api_keys": "alice:key-of-alice,bob:key-of-bob"})
    alice = (("authorization", "Bearer key-of-alice"),)
    bob = (("authorization", "Bearer key-of-bob"),)
    long = pb.GenerateRequest(request_id="x", text="alice's long one",
                              sampling=pb.SamplingParams(max_tokens=200))
    running = Stream(stack.stub, long, metadata=alice)
    wait_for(lambda: running.chunks, 10, "alice's stream")
    short = pb.GenerateRequest(request_id="x", text="bob's", sampling=pb.SamplingParams(max_tokens=5))
    assert texts(stack.stub.Generate(short, timeout=30, metadata=bob)) == echo("bob's", 5)
    err = rpc_error(lambda: stack.stub.Generate(short, timeout=10, metadata=alice))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "already in flight" in err.details()
    running.cancel()
    stack.wait_idle()
