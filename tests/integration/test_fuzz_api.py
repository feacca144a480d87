"""Property-based fuzzing of the public API (hypothesis; bounded in examples and time) against the
real engine (a tiny random Llama, so that the sampler runs): whatever a client sends, it gets a
gRPC status within its deadline, never INTERNAL, UNKNOWN or UNAVAILABLE; afterwards the stack is
healthy, idle, and answers a reference greedy request exactly as before."""

from __future__ import annotations

import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.proto import pb
from tests.integration.test_drain import health
from tests.integration.test_faults_requests import SERVING
from tests.integration.svc_stack import real_engine
from tests.integration.test_services_stack import texts

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
DEADLINE_S = 3.0
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}

uint32 = st.integers(0, 2**32 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=80)
ids = st.lists(st.one_of(st.integers(3, 258), uint32), max_size=60)

# per field: (sane values, hostile values); a request takes sane values for all fields but a few
FIELDS = {
    "max_tokens": (st.integers(1, 40), uint32),
    "min_tokens": (st.integers(0, 3), uint32),
    "temperature": (st.floats(0, 2), floats),
    "top_p": (st.floats(0.05, 1), floats),
    "top_k": (st.integers(0, 50), int32),
    "min_p": (st.floats(0, 1), floats),
    "repetition_penalty": (st.floats(0.5, 2), floats),
    "presence_penalty": (st.floats(-2, 2), floats),
    "frequency_penalty": (st.floats(-2, 2), floats),
    "seed": (st.integers(0, 2**32), st.integers(-(2**63), 2**63 - 1)),
    "ignore_eos": (st.booleans(), st.booleans()),
    "logprobs": (st.integers(0, 5), uint32),
    "stop": (st.lists(st.text("abc", min_size=1, max_size=3), max_size=2),
             st.lists(text, max_size=20)),
    "stop_token_ids": (st.lists(st.integers(3, 258), max_size=3),
                       st.lists(st.one_of(st.integers(0, 300), uint32), max_size=300)),
}


@st.composite
def sampling(draw, sane_only=False):
    hostile = set() if sane_only else set(draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3)))
    msg = pb.SamplingParams()
    for name, (sane, bad) in FIELDS.items():
        if name in hostile or draw(st.booleans()):  # unset fields take the defaults
            value = draw(bad if name in hostile else sane)
            if isinstance(value, list):
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
    return msg


@st.composite
def generate_request(draw):
    # a quarter of the requests are sane throughout, so the stack's answers to valid work (not
    # only its refusals) are fuzzed too; the rest mix sane values with a few hostile ones
    if draw(st.integers(0, 3)) == 0:
        return pb.GenerateRequest(text=draw(st.text("abcdefgh ", min_size=1, max_size=40)),
                                  priority=draw(st.integers(-5, 5)),
                                  sampling=draw(sampling(sane_only=True)))
    req = pb.GenerateRequest(request_id=draw(st.one_of(st.just(""), text)),
                             priority=draw(st.one_of(st.integers(-5, 5), int32)),
                             sampling=draw(sampling()))
    kind = draw(st.sampled_from(["text", "text", "token_ids", "messages", "none"]))
    if kind == "text":
        req.text = draw(text)
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(ids))
    elif kind == "messages":
        turns = draw(st.lists(st.tuples(st.sampled_from(["user", "system", "robot", ""]), text),
                              max_size=4))
        req.messages.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in turns)
    return req


def test_every_request_gets_a_status_in_time_and_the_stack_is_unchanged(stack_factory, byte_llama):
    stack = stack_factory(executors=0)
    stack.add_executor(engine=real_engine(byte_llama))
    stack.wait_executors(1)
    reference = texts(stack.generate("reference prompt", max_tokens=12, temperature=0.0))
    assert reference
    seen: dict[grpc.StatusCode, int] = {}

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(generate_request())
    def one(request):
        t0 = time.monotonic()
        try:
            list(stack.stub.Generate(request, timeout=DEADLINE_S))
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert code in ALLOWED, (code, exc.details(), request)
        assert time.monotonic() - t0 < DEADLINE_S + 1.0, request
        seen[code] = seen.get(code, 0) + 1

    one()
    assert seen.get(grpc.StatusCode.OK, 0) >= 20 and seen.get(grpc.StatusCode.INVALID_ARGUMENT), seen
    assert health(stack.channel) == SERVING
    stack.wait_idle(15)
    assert texts(stack.generate("reference prompt", max_tokens=12, temperature=0.0)) == reference
