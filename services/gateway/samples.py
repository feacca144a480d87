"""One request's samples as the gateway streams them: what each sample streamed so far, the dedupe
of incoming deltas against it, and the coalescing of deltas that queued up while the request's
task was busy (they leave as one chunk: one detokenizer exchange, one message to the client)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.common.types import Delta, EngineRequest


class DetokenizerSession(Protocol):
    async def add(self, token_ids: Sequence[int], flush: bool = False) -> tuple[str, str | None]:
        """(new text, the stop string if one matched)."""

    async def aclose(self) -> None: ...


class TextlessSession:
    """The detokenizer of a model without a tokenizer (ModelInfo.token_ids_only): no text, no stop
    string, so no exchange with the tokenizer tier per chunk."""

    async def add(self, token_ids: Sequence[int], flush: bool = False) -> tuple[str, str | None]:
        return "", None

    async def aclose(self) -> None:
        pass


@dataclass
class Chunk:
    """One GenerateResponse: one sample's tokens and text new since its previous chunk."""

    request_id: str
    index: int = 0
    """The sample (0..n-1)."""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str = ""
    usage: tuple[int, int, int] | None = None
    """(prompt, completion, cached) tokens of this sample, on its last chunk."""
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """On sample 0's first chunk, when asked: one entry per prompt token (the first is None)."""
    prompt_token_ids: tuple[int, ...] = ()
    """With prompt_logprobs: the prompt they are of."""


class Sample:
    """One sample of a request: its engine request (the current attempt), its detokenizer, what
    it streamed. `done`: nothing to abort (it ended in the engine, or failed there); `ended`: it
    sends nothing more."""

    def __init__(self, client_id: str, index: int, request: EngineRequest, num_prompt_tokens: int):
        self.client_id = client_id
        self.index = index
        self.request = request
        self.detok: DetokenizerSession | None = None
        self.tokens: list[int] = []
        self.prompt_tokens = num_prompt_tokens
        self.cached_tokens = 0
        self.prompt_logprobs: list | None = None
        """Arrived, not yet sent."""
        self.prompt_logprobs_sent = False
        self.done = False
        self.ended = False

    async def take(self, delta: Delta) -> Chunk | None:
        """The chunk for a delta that starts at or before len(tokens) (the caller resubmits after
        a gap); None when it brings nothing new."""
        skip, new = self._accept(delta)
        text, stop = await self.detok.add(new, flush=delta.finish_reason is not None)
        return self._chunk(delta, skip, new, text, stop)

    def take_now(self, delta: Delta) -> Chunk | None:
        """take() for a sample whose detokenizer is a TextlessSession (`textless`): no exchange,
        so no coroutine per token."""
        skip, new = self._accept(delta)
        return self._chunk(delta, skip, new, "", None)

    @property
    def textless(self) -> bool:
        return type(self.detok) is TextlessSession

    def _accept(self, delta: Delta) -> tuple[int, list[int]]:
        skip = len(self.tokens) - delta.first_index
        new = delta.token_ids[skip:]
        if delta.num_prompt_tokens:
            self.cached_tokens = delta.num_cached_tokens
        if delta.prompt_logprobs is not None and not self.prompt_logprobs_sent:
            self.prompt_logprobs = delta.prompt_logprobs
        self.tokens.extend(new)
        return skip, new

    def _chunk(self, delta: Delta, skip: int, new: list[int], text: str,
               stop: str | None) -> Chunk | None:
        if not (new or text or stop or delta.finish_reason):
            return None
        chunk = Chunk(self.client_id, self.index, new, text,
                      logprobs=delta.logprobs[skip:] if delta.logprobs else None)
        if self.prompt_logprobs is not None:
            chunk.prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
            chunk.prompt_token_ids = self.request.prompt_token_ids
            self.prompt_logprobs_sent = True
        if stop:
            chunk.finish_reason, chunk.stop_reason = "stop", stop
        elif delta.finish_reason:
            chunk.finish_reason = delta.finish_reason
            if delta.stop_token_id is not None:
                chunk.stop_reason = str(delta.stop_token_id)
        if chunk.finish_reason:
            chunk.usage = self.usage()
        return chunk

    def usage(self) -> tuple[int, int, int]:
        return self.prompt_tokens, len(self.tokens), self.cached_tokens

    def cancelled(self) -> Chunk:
        """The last chunk of a sample the gateway stops (the server shuts down)."""
        self.ended = True
        return Chunk(self.client_id, self.index, finish_reason="abort", usage=self.usage())


def coalesce(items: list) -> list:
    """Merges runs of deltas of one request and attempt that follow each other exactly (what the
    executor sent over several steps while this request's task was busy); anything else (errors,
    notices, markers, gaps) stays as it is."""
    if len(items) == 1:  # the usual case: one step's delta
        return items
    out: list = []
    for item in items:
        prev = out[-1] if out else None
        if (isinstance(item, Delta) and isinstance(prev, Delta) and _joinable(prev, item)):
            out[-1] = _join(prev, item)
        else:
            out.append(item)
    return out


def _joinable(a: Delta, b: Delta) -> bool:
    return (a.request_id == b.request_id and a.attempt == b.attempt
            and b.first_index == a.first_index + len(a.token_ids)
            and a.finish_reason is None and a.error is None and not a.executor_lost
            and b.error is None and not b.executor_lost and not b.num_prompt_tokens
            and (a.logprobs is None) == (b.logprobs is None))


def _join(a: Delta, b: Delta) -> Delta:
    return Delta(a.request_id, a.attempt, a.first_index, a.token_ids + b.token_ids,
                 finish_reason=b.finish_reason, stop_token_id=b.stop_token_id,
                 num_prompt_tokens=a.num_prompt_tokens, num_cached_tokens=a.num_cached_tokens,
                 logprobs=(a.logprobs + b.logprobs) if a.logprobs is not None else None,
                 queue_time_s=a.queue_time_s, prompt_logprobs=a.prompt_logprobs)
