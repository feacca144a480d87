"""The public taxiway.v1.Gateway API on grpc.aio: thin handlers over GatewayCore and the one
conversion of its messages (GenerateRequest in, GenerateResponse out)."""

from __future__ import annotations

import contextlib

from opentelemetry import context as otel_context

from gpu_engine import limits
from gpu_engine.errors import InvalidRequest
from services.common import convert
from services.common.auth import current_caller
from services.common.proto import pb
from services.common.telemetry import extract_context
from services.gateway.core import Chunk, GatewayCore, GenerateInput


class GatewayServicer:
    def __init__(self, core: GatewayCore):
        self.core = core

    async def Generate(self, request, context):
        async with contextlib.aclosing(self._generate(request, context)) as chunks:
            async for chunk in chunks:
                yield chunk_to_pb(chunk)

    async def GenerateOnce(self, request, context):
        if request.sampling.n > 1:
            raise InvalidRequest(f"GenerateOnce returns one sample; for n={request.sampling.n} "
                                 "samples call Generate (each response has its sample's index)")
        async with contextlib.aclosing(self._generate(request, context)) as stream:
            chunks = [c async for c in stream]
        return chunk_to_pb(merge_chunks(chunks, chunks[-1].request_id if chunks else ""))

    def _generate(self, request, context):
        return self.core.generate(generate_input_from_pb(request), caller=current_caller(),
                                  timeout_s=context.time_remaining(),
                                  parent=extract_context(context.invocation_metadata()))

    async def Tokenize(self, request, context):
        token = otel_context.attach(extract_context(context.invocation_metadata()))
        try:  # the client's trace context goes on to the tokenizer tier
            ids, text = await self.core.tokenizer.tokenize(**convert.tokenize_request_from_pb(request))
        finally:
            otel_context.detach(token)
        return pb.TokenizeResponse(token_ids=ids, text=text)

    async def GetModelInfo(self, request, context):
        return convert.model_info_to_pb(await self.core.tokenizer.model_info())


def generate_input_from_pb(msg) -> GenerateInput:
    if len(msg.request_id) > limits.MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request_id may have at most {limits.MAX_REQUEST_ID_CHARS} "
                             f"characters, got {len(msg.request_id)}")
    kind = msg.WhichOneof("prompt")
    params = convert.sampling_from_pb(msg.sampling)
    fields = {"request_id": msg.request_id, "priority": msg.priority,
              "params": params}
    if kind == "text":
        return GenerateInput(text=msg.text, **fields)
    if kind == "token_ids":
        return GenerateInput(token_ids=tuple(msg.token_ids.ids), **fields)
    if kind == "messages":
        return GenerateInput(messages=[{"role": m.role, "content": m.content}
                                       for m in msg.messages.messages], **fields)
    raise InvalidRequest("no prompt: set text, token_ids or messages")


def chunk_to_pb(chunk: Chunk):
    msg = pb.GenerateResponse(request_id=chunk.request_id, token_ids=chunk.token_ids,
                              index=chunk.index)
    if chunk.text:  # fields left at their zero value are not set (the same bytes, less work)
        msg.text = chunk.text
    if chunk.stop_reason:
        msg.stop_reason = chunk.stop_reason
    if chunk.finish_reason:
        msg.finish_reason = pb.FinishReason.Value(convert.FINISH_REASONS[chunk.finish_reason])
    if chunk.usage:
        msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_tokens = chunk.usage
    for lp, token in zip(chunk.logprobs or (), chunk.token_ids):
        entry = msg.logprobs.add(token_id=token, logprob=lp.get(token, 0.0))
        entry.top_logprobs.update(lp)
    for lp, token in zip(chunk.prompt_logprobs or (), chunk.prompt_token_ids):
        entry = msg.prompt_logprobs.add(token_id=token)
        if lp is not None:
            entry.logprob = lp.get(token, 0.0)
            entry.top_logprobs.update(lp)
    return msg


def merge_chunks(chunks: list[Chunk], request_id: str) -> Chunk:
    merged = Chunk(request_id)
    for c in chunks:
        merged.token_ids += c.token_ids
        merged.text += c.text
        if c.logprobs:
            merged.logprobs = (merged.logprobs or []) + c.logprobs
        if c.prompt_logprobs:
            merged.prompt_logprobs, merged.prompt_token_ids = c.prompt_logprobs, c.prompt_token_ids
        merged.finish_reason = c.finish_reason or merged.finish_reason
        merged.stop_reason = c.stop_reason or merged.stop_reason
        merged.usage = c.usage or merged.usage
    return merged
