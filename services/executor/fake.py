"""A stand-in for gpu_engine.engine.LLMEngine with exactly its interface: deterministic tokens, a
block pool, a prefix cache of prompt blocks, abort freeing blocks at once. For unit tests and
`taxiway serve --fake-engine` (fast integration tests, no model).

Output token i of a request echoes the prompt's non-special tokens, cyclically: token
content[i % len(content)], so a resumed request (prior_output_token_ids) continues exactly where
the first attempt stopped, and a UTF-8 prompt comes back as the same characters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gpu_engine.errors import InvalidRequest
from gpu_engine.outputs import CompletionOutput, EngineStats, Recovery, RequestOutput
from gpu_engine.sampling_params import SamplingParams
from services.common.prefix import hash_token_blocks
from services.tokenizer.fake import OFFSET, ByteTokenizer


@dataclass
class FakeModelConfig:
    name: str = "fake-bytes"
    max_position_embeddings: int = 4096
    vocab_size: int = ByteTokenizer.vocab_size


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    priority: int
    arrival: int
    prior: list[int]
    content: list[int]
    output: list[int] = field(default_factory=list)
    blocks: int = 0
    cached_tokens: int = 0
    prefilled: bool = False

    @property
    def num_generated(self) -> int:
        return len(self.prior) + len(self.output)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + self.num_generated


class FakeEngine:
    def __init__(self, *, num_blocks: int = 256, block_size: int = 4, max_num_seqs: int = 64,
                 max_model_len: int = 4096, step_delay_s: float = 0.0):
        self.tokenizer = ByteTokenizer()
        self.model_config = FakeModelConfig(max_position_embeddings=max_model_len)
        self.max_model_len = max_model_len
        self.eos_token_ids = self.tokenizer.eos_token_ids
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.step_delay_s = step_delay_s
        self._free = num_blocks
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []
        self._arrivals = 0
        self._cached: set[bytes] = set()
        self._kv_events: list[tuple[str, bytes]] = []
        self._queries = self._hits = self._preemptions = 0

    # -- the LLMEngine interface --------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                    priority: int = 0, prior_output_token_ids: Sequence[int] = ()) -> None:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequest("the prompt is empty")
        vocab = self.model_config.vocab_size
        for what, tokens in (("prompt", ids), ("stop_token_ids", params.stop_token_ids),
                             ("prior_output_token_ids", prior_output_token_ids)):
            bad = [t for t in tokens if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(f"{what} holds token id {bad[0]}, outside the vocabulary "
                                     f"[0, {vocab})")
        budget = len(ids) + (params.max_tokens or 1)
        if budget > self.max_model_len:
            raise InvalidRequest(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                                 f"exceeds the context length {self.max_model_len}")
        if any(r.request_id == request_id for r in self._waiting + self._running):
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        content = [t for t in ids if t >= OFFSET] or [OFFSET + ord("a")]
        self._arrivals += 1
        self._waiting.append(_Request(request_id, ids, params, priority, self._arrivals,
                                      list(prior_output_token_ids), content))

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        for req in [r for r in self._running if r.request_id in ids]:
            self._release(req)
            self._running.remove(req)
        self._waiting = [r for r in self._waiting if r.request_id not in ids]

    def step(self) -> list[RequestOutput]:
        if not self.has_unfinished_requests():
            return []
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self._admit()
        outputs = []
        for req in list(self._running):
            if not self._grow(req):
                continue
            outputs.append(self._decode_one(req))
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running)

    def recover(self) -> Recovery:
        """As LLMEngine.recover: aborts the running batch, keeps the waiting requests."""
        aborted = tuple(r.request_id for r in self._running)
        batch = tuple(f"{r.request_id}: {r.num_tokens} tokens, {r.blocks} blocks" for r in self._running)
        self.abort_request(aborted)
        held = sum(r.blocks for r in self._waiting)
        broken = None if self._free + held == self.num_blocks else (
            f"{self.num_blocks - self._free - held} blocks are held by no request")
        return Recovery(aborted, batch, broken)

    def stats(self) -> EngineStats:
        backlog = sum(len(r.prompt) for r in self._waiting)
        return EngineStats(self.num_blocks, self._free, self.block_size, len(self._running),
                           len(self._waiting), backlog, self._queries, self._hits, self._preemptions)

    def take_kv_events(self) -> list[tuple[str, bytes]]:
        events, self._kv_events = self._kv_events, []
        return events

    # -- internals ------------------------------------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def _admit(self) -> None:
        self._waiting.sort(key=lambda r: (r.priority, r.arrival))
        while self._waiting and len(self._running) < self.max_num_seqs:
            req = self._waiting[0]
            need = self._blocks_for(req.num_tokens + 1)
            if need > self._free:
                break
            self._waiting.pop(0)
            self._free -= need
            req.blocks = need
            self._prefill(req)
            self._running.append(req)

    def _prefill(self, req: _Request) -> None:
        hashes = hash_token_blocks(req.prompt, self.block_size)
        hit = 0
        for h in hashes:
            if h not in self._cached:
                break
            hit += 1
        self._queries += len(hashes)  # in blocks, as the real engine counts
        self._hits += hit
        req.cached_tokens = hit * self.block_size
        for h in hashes[hit:]:
            self._cached.add(h)
            self._kv_events.append(("stored", h))

    def _grow(self, req: _Request) -> bool:
        need = self._blocks_for(req.num_tokens + 1) - req.blocks
        if need <= self._free:
            self._free -= need
            req.blocks += need
            return True
        self._preemptions += 1  # no room: back to the waiting queue, recomputed later
        self._release(req)
        self._running.remove(req)
        req.prior += req.output
        req.output = []
        self._waiting.append(req)
        return False

    def _release(self, req: _Request) -> None:
        self._free += req.blocks
        req.blocks = 0

    def _decode_one(self, req: _Request) -> RequestOutput:
        p = req.params
        token = req.content[req.num_generated % len(req.content)]
        req.output.append(token)
        n = req.num_generated
        finish, stop_reason = None, None
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
        if token in stops and n >= p.min_tokens:
            finish, stop_reason = "stop", token
        elif (p.max_tokens is not None and n >= p.max_tokens) or \
                req.num_tokens >= self.max_model_len:
            finish = "length"
        logprobs = [{token: -0.5}] if p.logprobs is not None else None
        completion = CompletionOutput(0, [token], finish_reason=finish, stop_reason=stop_reason,
                                      logprobs=logprobs)
        if finish:
            self._release(req)
            self._running.remove(req)
        return RequestOutput(req.request_id, None, req.prompt, [completion], finished=bool(finish),
                             num_cached_tokens=req.cached_tokens)
