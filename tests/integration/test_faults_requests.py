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
from services.executor.faults import StepFaults
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


def kv_pressure(stack, **executor_options):
    """Three streams on an executor with too few KV blocks for all of them: one is preempted and
    waits inside the engine while the other two run. Returns the executor, its fault injector
    (armed by the caller) and the streams."""
    faults = StepFaults(FakeEngine(num_blocks=20, block_size=4, step_delay_s=0.02))
    executor = stack.add_executor(engine=faults, **executor_options)
    stack.wait_executors(1)
    prompts = [f"s{i} kv" for i in range(3)]  # 2 blocks each at first, 17 at the end
    streams = [Stream.text(stack.stub, p, 60) for p in prompts]
    wait_for(lambda: faults.stats().num_preemptions >= 1 and faults.stats().num_waiting == 1
             and faults.stats().num_running == 2, 20, "one stream preempted, two running")
    return executor, faults, streams, prompts


def test_an_exception_in_a_step_fails_its_batch_and_the_executor_goes_on(stack_factory,
                                                                        fault_report):
    """A step that raises fails the requests of its batch with INTERNAL, and only them; the
    request preempted and waiting in the engine runs on after it, and so do new ones. Before, the
    step-loop thread died and everything hung to its deadline."""
    stack = stack_factory(executors=0)
    executor, faults, streams, prompts = kv_pressure(stack)
    fault_at = time.monotonic()
    faults.arm()
    for s in streams:
        s.wait(30)
    failed = [s for s in streams if s.error is not None]
    survived = [(s, p) for s, p in zip(streams, prompts) if s.error is None]
    assert len(failed) == 2 and len(survived) == 1
    for s in failed:
        assert s.error.code() == grpc.StatusCode.INTERNAL
        assert "the engine step failed (InjectedFault" in s.error.details()
    (s, p), = survived
    assert s.output == echo(p, 60)
    assert texts(stack.generate("and a new one", max_tokens=6)) == echo("and a new one", 6)
    assert executor.core.broken is None and health(stack.channel) == SERVING
    stack.wait_idle()
    lost, dup = lost_and_duplicated(echo(p, 60), s.output)
    fault_report(fault="exception in one engine step", streams=3, lost=lost, duplicated=dup,
                 recover_s=recovery_s([s], fault_at),
                 note="its batch (2 streams) INTERNAL; the preempted stream exact, same executor")


def test_an_executor_that_cannot_go_on_leaves_and_its_requests_move(stack_factory, fault_report):
    """A step fails and the engine cannot go on (max_step_failures=1 here; a CUDA error or a
    broken block pool does it too): the executor turns NOT_SERVING and leaves the pool; the
    requests of the failing batch get INTERNAL, the preempted one resumes on the other executor,
    exactly."""
    stack = stack_factory(executors=0)
    broken, faults, streams, prompts = kv_pressure(stack, max_step_failures=1)
    stack.add_executor()  # the survivor
    stack.wait_executors(2)
    fault_at = time.monotonic()
    faults.arm()
    for s in streams:
        s.wait(30)
    survived = [(s, p) for s, p in zip(streams, prompts) if s.error is None]
    assert [s.error.code() for s in streams if s.error] == [grpc.StatusCode.INTERNAL] * 2
    (s, p), = survived
    assert s.output == echo(p, 60)
    assert broken.core.broken.startswith("1 engine steps failed in a row")
    with internal_channel(broken.server.address) as channel:
        assert health(channel) == NOT_SERVING
    survivor = [stack.executors[1].executor_id]
    wait_for(lambda: [e.executor_id for e in stack.state().executors] == survivor, 10,
             "the broken executor to leave the scheduler's view")
    assert stack.state().executors[0].num_admitted == 1  # the preempted one, resumed there
    lost, dup = lost_and_duplicated(echo(p, 60), s.output)
    fault_report(fault="an engine that cannot go on (executor leaves the pool)", streams=3,
                 lost=lost, duplicated=dup, recover_s=recovery_s([s], fault_at),
                 note="failing batch (2) INTERNAL; the preempted stream resumed elsewhere, exact")


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
