"""protobuf <-> domain objects for what crosses tiers (requests, deltas, states, sampling, model
info). A servicer converts only its own RPC's envelope (e.g. the gateway's GenerateResponse)."""

from __future__ import annotations

import dataclasses

from gpu_engine.sampling_params import OutputKind, SamplingParams
from services.common.proto import pb
from services.common.types import (Abort, Delta, Ended, EngineRequest, ExecutorState, KvEvent,
                                    ModelInfo)

_OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_p", "repetition_penalty", "seed", "logprobs",
                      "prompt_logprobs")
_PLAIN_SAMPLING = ("min_tokens", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "ignore_eos")

FINISH_REASONS = {
    "stop": "FINISH_REASON_STOP",
    "length": "FINISH_REASON_LENGTH",
    "abort": "FINISH_REASON_CANCELLED",
}


# -- sampling parameters -------------------------------------------------------------------------

def sampling_from_pb(msg, **overrides) -> SamplingParams:
    """SamplingParams from a pb.SamplingParams (validated: raises InvalidRequest)."""
    kwargs = {name: getattr(msg, name) for name in _PLAIN_SAMPLING}
    for name in _OPTIONAL_SAMPLING:
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        if name in kwargs:  # float32 on the wire: 0.9 -> 0.8999999761581421
            kwargs[name] = round(float(kwargs[name]), 6)
    kwargs["stop"] = tuple(msg.stop)
    kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    kwargs["n"] = msg.n or 1
    kwargs.update(overrides)
    return SamplingParams(**kwargs)


def sampling_to_pb(params: SamplingParams):
    msg = pb.SamplingParams(stop=list(params.stop), stop_token_ids=list(params.stop_token_ids),
                            n=params.n)
    for name in _PLAIN_SAMPLING:
        setattr(msg, name, getattr(params, name))
    for name in _OPTIONAL_SAMPLING:
        value = getattr(params, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def engine_params(params: SamplingParams) -> SamplingParams:
    """The executor's view: token ids only (stop strings are matched by the gateway), deltas."""
    return dataclasses.replace(params, stop=(), include_stop_str_in_output=False, detokenize=False,
                               output_kind=OutputKind.DELTA)


# -- the request stream ----------------------------------------------------------------------------

def engine_request_to_pb(req: EngineRequest):
    return pb.EngineRequest(
        request_id=req.request_id, gateway_id=req.gateway_id, attempt=req.attempt,
        prompt_token_ids=list(req.prompt_token_ids),
        prior_output_token_ids=list(req.prior_output_token_ids),
        sampling=sampling_to_pb(req.params), priority=req.priority,
        arrival_time=req.arrival_time, deadline=req.deadline or 0.0, traceparent=req.traceparent,
        queue_time_s=req.queue_time_s, client_request_id=req.client_request_id)


def engine_request_from_pb(msg) -> EngineRequest:
    return EngineRequest(
        request_id=msg.request_id, gateway_id=msg.gateway_id, attempt=msg.attempt,
        prompt_token_ids=tuple(msg.prompt_token_ids),
        prior_output_token_ids=tuple(msg.prior_output_token_ids),
        params=sampling_from_pb(msg.sampling), priority=msg.priority,
        arrival_time=msg.arrival_time, deadline=msg.deadline or None, traceparent=msg.traceparent,
        queue_time_s=msg.queue_time_s, client_request_id=msg.client_request_id)


def queue_entry_to_bytes(item: EngineRequest | Abort) -> bytes:
    if isinstance(item, Abort):
        msg = pb.QueueEntry(abort=pb.AbortEntry(request_id=item.request_id, reason=item.reason))
    else:
        msg = pb.QueueEntry(submit=engine_request_to_pb(item))
    return msg.SerializeToString()


def queue_entry_from_bytes(data: bytes) -> EngineRequest | Abort:
    """Raises InvalidRequest (sampling) or DecodeError (garbage) for a bad entry."""
    msg = pb.QueueEntry.FromString(data)
    if msg.WhichOneof("kind") == "abort":
        return Abort(msg.abort.request_id, msg.abort.reason)
    return engine_request_from_pb(msg.submit)


# -- the output streams ----------------------------------------------------------------------------

def _fill_delta(msg, d: Delta) -> None:
    """Sets the fields of `msg` (a pb.RequestDelta) that differ from their zero value: a decode
    step's delta has an id, an attempt, an index and a token; the rest is rare."""
    msg.request_id = d.request_id
    if d.attempt:
        msg.attempt = d.attempt
    if d.first_index:
        msg.first_index = d.first_index
    msg.token_ids.extend(d.token_ids)
    if d.finish_reason:
        msg.finish_reason = d.finish_reason
    if d.num_prompt_tokens:
        msg.num_prompt_tokens = d.num_prompt_tokens
    if d.num_cached_tokens:
        msg.num_cached_tokens = d.num_cached_tokens
    if d.executor_lost:
        msg.executor_lost = True
    if d.queue_time_s:
        msg.queue_time_s = d.queue_time_s
    if d.stop_token_id is not None:
        msg.stop_token_id = d.stop_token_id
    if d.error is not None:
        msg.error.kind, msg.error.message = d.error
    for lp in d.logprobs or ():
        msg.logprobs.add().logprobs.update(lp)
    for lp in d.prompt_logprobs or ():
        msg.prompt_logprobs.add().logprobs.update(lp or {})


def delta_from_pb(msg) -> Delta:
    # positional (Delta's field order): keywords cost a quarter of this function, once per token
    d = Delta(msg.request_id, msg.attempt, msg.first_index, list(msg.token_ids),
              msg.finish_reason or None, None, msg.num_prompt_tokens, msg.num_cached_tokens, None,
              msg.executor_lost, None, msg.queue_time_s)
    if msg.HasField("stop_token_id"):
        d.stop_token_id = msg.stop_token_id
    if msg.HasField("error"):
        d.error = (msg.error.kind, msg.error.message)
    if logprobs := msg.logprobs:
        d.logprobs = [dict(lp.logprobs) for lp in logprobs]
    if prompt_logprobs := msg.prompt_logprobs:
        d.prompt_logprobs = [dict(lp.logprobs) or None for lp in prompt_logprobs]
    return d


def output_batch_to_bytes(source: str, deltas: list[Delta]) -> bytes:
    """One OutputBatch: each delta filled in place in the batch (no message built and copied per
    delta: the executor encodes one per request per step)."""
    batch = pb.OutputBatch(source=source)
    add = batch.deltas.add
    for d in deltas:
        _fill_delta(add(), d)
    return batch.SerializeToString()


def output_batch_from_bytes(data: bytes) -> list[Delta]:
    return [delta_from_pb(d) for d in pb.OutputBatch.FromString(data).deltas]


# -- executor state ----------------------------------------------------------------------------------

_STATE_SCALARS = ("executor_id", "seq", "full", "num_total_blocks", "num_free_blocks", "block_size",
                  "num_running", "num_waiting", "prefill_backlog_tokens", "max_num_seqs",
                  "last_admit_seq", "max_model_len", "draining")


def state_to_pb(s: ExecutorState):
    msg = pb.ExecutorState(**{k: getattr(s, k) for k in _STATE_SCALARS})
    msg.finished_request_ids.extend(s.finished_request_ids)
    msg.running_request_ids.extend(s.running_request_ids)
    for e in s.kv_events:
        msg.kv_events.add(stored=e.stored, block_hash=e.block_hash)
    for e in s.ended:
        msg.ended.add(request_id=e.request_id, attempt=e.attempt)
    return msg


def state_from_pb(msg) -> ExecutorState:
    return ExecutorState(
        **{k: getattr(msg, k) for k in _STATE_SCALARS},
        finished_request_ids=tuple(msg.finished_request_ids),
        running_request_ids=tuple(msg.running_request_ids),
        kv_events=tuple(KvEvent(e.stored, e.block_hash) for e in msg.kv_events),
        ended=tuple(Ended(e.request_id, e.attempt) for e in msg.ended))


# -- model info ----------------------------------------------------------------------------------------

def model_info_to_pb(info: ModelInfo):
    return pb.ModelInfo(name=info.name, max_context_length=info.max_context_length,
                        vocab_size=info.vocab_size, eos_token_ids=list(info.eos_token_ids),
                        token_ids_only=info.token_ids_only)


def model_info_from_pb(msg) -> ModelInfo:
    return ModelInfo(msg.name, msg.max_context_length, msg.vocab_size, tuple(msg.eos_token_ids),
                     msg.token_ids_only)


# -- tokenizer tier ----------------------------------------------------------------------------------

def tokenize_request_from_pb(msg) -> dict:
    """Keyword arguments of TokenizerCore.tokenize (pb.TokenizeRequest, public or internal)."""
    kind = msg.WhichOneof("input")
    if kind == "messages":
        return {"messages": [{"role": m.role, "content": m.content} for m in msg.messages.messages]}
    return {"text": msg.text if kind == "text" else None,
            "add_special_tokens": msg.add_special_tokens}


def detokenize_setup_from_pb(msg) -> dict:
    return {"prompt_token_ids": list(msg.prompt_token_ids),
            "skip_special_tokens": msg.skip_special_tokens, "stop": list(msg.stop),
            "include_stop_str_in_output": msg.include_stop_str_in_output}
