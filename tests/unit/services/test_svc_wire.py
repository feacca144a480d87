"""The wire contract: protos load at run time, conversions round-trip, errors map once."""

from __future__ import annotations

import grpc
import pytest

from gpu_engine.errors import DeadlineExceeded, InvalidRequest, NotReady, Overloaded
from gpu_engine.sampling_params import OutputKind, SamplingParams
from services.common import convert, errors
from services.common.proto import pb, service_descriptor
from services.common.types import Abort, Delta, Ended, EngineRequest, ExecutorState, KvEvent


def test_every_proto_field_is_commented_and_enums_are_prefixed():
    from services.common.proto import PROTO_ROOT

    for path in sorted((PROTO_ROOT / "taxiway" / "v1").glob("*.proto")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            is_field = s.endswith(";") and "=" in s and not s.startswith(("option", "syntax"))
            if is_field:
                assert lines[i - 1].strip().startswith("//"), f"{path.name}:{i + 1} lacks a comment"
    names = [v.name for v in pb.FinishReason.DESCRIPTOR.values]
    assert names[0] == "FINISH_REASON_UNSPECIFIED" and all(n.startswith("FINISH_REASON_") for n in names)
    assert [m.name for m in service_descriptor("Gateway").methods] == [
        "Generate", "GenerateOnce", "Tokenize", "GetModelInfo"]


def test_sampling_round_trip_and_validation():
    params = SamplingParams(max_tokens=7, temperature=0.7, top_p=0.9, top_k=5, seed=3,
                            stop=("x", "yz"), stop_token_ids=(9,), logprobs=2, ignore_eos=True)
    back = convert.sampling_from_pb(convert.sampling_to_pb(params))
    assert back == params
    assert convert.sampling_from_pb(pb.SamplingParams()) == SamplingParams()
    with pytest.raises(InvalidRequest, match="top_p"):
        convert.sampling_from_pb(pb.SamplingParams(top_p=1.5))
    engine = convert.engine_params(params)
    assert engine.stop == () and engine.detokenize is False and engine.output_kind is OutputKind.DELTA


def test_queue_entries_and_output_batches_round_trip():
    req = EngineRequest("g:1", "g", (1, 2, 3), SamplingParams(max_tokens=4), attempt=2,
                        prior_output_token_ids=(5, 6), priority=-1, arrival_time=12.5,
                        deadline=99.0, traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    assert convert.queue_entry_from_bytes(convert.queue_entry_to_bytes(req)) == req
    assert convert.queue_entry_from_bytes(convert.queue_entry_to_bytes(Abort("g:1", "x"))) == Abort("g:1", "x")
    deltas = [Delta("a", 1, 4, [7, 8], "stop", 8, 3, 0, logprobs=[{7: -0.5}, {8: -1.0}]),
              Delta("b", error=("Overloaded", "full")), Delta("c", executor_lost=True)]
    assert convert.output_batch_from_bytes(convert.output_batch_to_bytes("e", deltas)) == deltas


def test_executor_state_round_trip():
    s = ExecutorState("e1", seq=4, full=True, num_total_blocks=10, num_free_blocks=3,
                      finished_request_ids=("a",), running_request_ids=("b",),
                      kv_events=(KvEvent(True, b"h"),), max_model_len=2048,
                      ended=(Ended("a", 0), Ended("c", 2)))
    assert convert.state_from_pb(convert.state_to_pb(s)) == s


@pytest.mark.parametrize("exc, code", [
    (InvalidRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReady("x"), grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (RuntimeError("x"), grpc.StatusCode.INTERNAL),
])
def test_one_error_mapping(exc, code):
    assert errors.status_of(exc) is code
    if code is not grpc.StatusCode.INTERNAL:
        back = errors.from_wire(*errors.to_wire(exc))
        assert type(back) is type(exc) and str(back) == "x"
