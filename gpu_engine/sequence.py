"""Request and sequence state. No torch: the scheduler and its tests work on these alone."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from gpu_engine.outputs import Logprobs
from gpu_engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()
_arrivals = itertools.count()


class Sequence:
    """One sample of a request: its tokens, how many of them are in the KV cache, its blocks.

    While the sequence runs it owns a slot (row) of the scheduler's BatchState, and its counters
    (num_computed_tokens, num_pending, num_registered_blocks) live in that row's numpy arrays, so
    that a step updates them for the whole batch at once; otherwise they live here.
    """

    __slots__ = ("request", "index", "token_ids", "num_prompt_tokens", "seq_id", "status", "block_table",
                 "block_hashes", "finish_reason", "stop_reason", "logprobs", "cumulative_logprob",
                 "num_reported_tokens", "num_preemptions", "slot", "_batch", "_num_computed", "_num_pending",
                 "_num_registered", "draft_token_ids", "draft_probs", "num_draft_tokens", "num_accepted_tokens")

    def __init__(self, request: Request, index: int, token_ids: list[int], num_prompt_tokens: int, *,
                 status: SeqStatus = SeqStatus.WAITING, num_computed_tokens: int = 0,
                 block_table: list[int] | None = None, block_hashes: list[bytes] | None = None,
                 num_registered_blocks: int = 0, num_reported_tokens: int = 0, num_pending: int = 0):
        self.request = request
        self.index = index  # which of the request's n samples this is
        self.token_ids = token_ids  # prompt, then generated tokens (PENDING: drawn, not read back)
        self.num_prompt_tokens = num_prompt_tokens
        self.seq_id = next(_seq_ids)
        self.status = status
        self.block_table: list[int] = [] if block_table is None else block_table
        # Hashes of the leading full blocks of token_ids, computed as they fill.
        self.block_hashes: list[bytes] = [] if block_hashes is None else block_hashes
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[Logprobs] = []
        self.cumulative_logprob = 0.0
        self.num_reported_tokens = num_reported_tokens  # generated tokens already reported (DELTA)
        self.num_preemptions = 0
        self.slot = -1  # its row in the scheduler's BatchState while running, else -1
        self._batch = None
        # Speculative decoding: tokens proposed for the next step (verified there, then cleared),
        # the distributions they were drawn from ([k, vocab] tensor, None: point masses), and how
        # many tokens were drafted for and accepted from this sequence so far.
        self.draft_token_ids: list[int] = []
        self.draft_probs = None
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self._num_computed = num_computed_tokens
        self._num_pending = num_pending
        self._num_registered = num_registered_blocks

    # -- counters: in the batch row while running, here otherwise ---------------------------------
    @property
    def num_computed_tokens(self) -> int:
        """Leading tokens whose K/V are in the cache."""
        b = self._batch
        return self._num_computed if b is None else int(b.num_computed[self.slot])

    @num_computed_tokens.setter
    def num_computed_tokens(self, value: int) -> None:
        if self._batch is None:
            self._num_computed = value
        else:
            self._batch.num_computed[self.slot] = value

    @property
    def num_pending(self) -> int:
        """Trailing placeholder tokens: sampled by a launched step whose result is not read yet."""
        b = self._batch
        return self._num_pending if b is None else int(b.num_pending[self.slot])

    @num_pending.setter
    def num_pending(self, value: int) -> None:
        if self._batch is None:
            self._num_pending = value
        else:
            self._batch.num_pending[self.slot] = value

    @property
    def num_registered_blocks(self) -> int:
        """Leading blocks already offered to the prefix cache."""
        b = self._batch
        return self._num_registered if b is None else int(b.num_registered[self.slot])

    @num_registered_blocks.setter
    def num_registered_blocks(self, value: int) -> None:
        if self._batch is None:
            self._num_registered = value
        else:
            self._batch.num_registered[self.slot] = value

    # -- derived ----------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, placeholders included (the index the next sample gets)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens known on the host (placeholders left out)."""
        return self.token_ids[self.num_prompt_tokens : len(self.token_ids) - self.num_pending]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Queue order: priority (lower first), then arrival, then sample index."""
        return (self.request.priority, self.request.arrival_order, self.index)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request.request_id!r}, index={self.index}, "
                f"tokens={len(self.token_ids)}, computed={self.num_computed_tokens}, {self.status.value})")


@dataclass(eq=False)
class Request:
    """What a caller submitted: a prompt and its parameters; it owns its n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    """The seed sampling uses (the caller's, or one the engine drew)."""
    eos_token_ids: frozenset[int]
    max_model_len: int
    priority: int = 0
    num_prior_output_tokens: int = 0
    """Generated tokens brought along from elsewhere (resume); they count as output but are not
    reported again."""
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_order: int = field(default_factory=lambda: next(_arrivals))
    seqs: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int = 0
    aborted: bool = False
    prompt_logprobs: list[Logprobs | None] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    @property
    def max_tokens(self) -> int:
        """Most tokens each sample may generate, bounded by the model's context."""
        room = self.max_model_len - len(self.prompt_token_ids)
        if self.params.max_tokens is None:
            return room
        return min(self.params.max_tokens, room)

    @property
    def pending_forks(self) -> int:
        """Samples not yet split off the first sequence (they fork when the prompt is done)."""
        return self.params.n - len(self.seqs)

    @property
    def finished(self) -> bool:
        if self.aborted:
            return True
        if self.pending_forks:
            return False
        for s in self.seqs:  # a loop, not all(generator): asked of every streamed request every step
            if not s.is_finished:
                return False
        return True
