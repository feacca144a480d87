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


@dataclass(eq=False)
class Sequence:
    """One sample of a request: its tokens, how many of them are in the KV cache, its blocks."""

    request: Request
    index: int
    """Which of the request's n samples this is."""
    token_ids: list[int]
    """Prompt followed by the generated tokens."""
    num_prompt_tokens: int
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    """Leading tokens whose K/V are in the cache."""
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    """Hashes of the leading full blocks of token_ids, computed as they fill."""
    num_registered_blocks: int = 0
    """Leading blocks already offered to the prefix cache."""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[Logprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    num_reported_tokens: int = 0
    """Generated tokens already reported (OutputKind.DELTA)."""
    num_preemptions: int = 0
    num_pending: int = 0
    """Trailing placeholder tokens: sampled by a launched step whose result is not read yet."""

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
        return self.pending_forks == 0 and all(s.is_finished for s in self.seqs)
