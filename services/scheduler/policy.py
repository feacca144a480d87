"""Admission, as two small policies: does a request fit an executor (capacity), and which of the
executors it fits is best (placement). Both read an `ExecutorView`; neither changes it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.common.prefix import hash_token_blocks
from services.common.types import EngineRequest, ExecutorState


@dataclass
class ExecutorView:
    """The scheduler's picture of one executor: its latest state plus what was admitted since."""

    executor_id: str
    address: str
    state: ExecutorState | None = None
    reserved: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    """admit_seq -> (request id, blocks, prompt tokens) not yet reflected in `state`."""
    requests: set[str] = field(default_factory=set)
    cached: set[bytes] = field(default_factory=set)
    last_seen: float = 0.0
    num_admitted: int = 0
    admit_seq: int = 0
    """The last admission sequence number sent to it (continues from its last_admit_seq)."""
    draining: bool = False
    """It got SIGTERM: it finishes what it runs and admits nothing more."""

    @property
    def ready(self) -> bool:
        return self.state is not None and not self.draining

    def prefix_hit_blocks(self, hashes: list[bytes]) -> int:
        hit = 0
        for h in hashes:
            if h not in self.cached:
                break
            hit += 1
        return hit


@dataclass(frozen=True)
class Fit:
    view: ExecutorView
    blocks: int
    hit_blocks: int


class CapacityPolicy:
    """Fits when the executor has a batch slot, KV blocks for the prompt (minus what its prefix
    cache holds) above a watermark, and a prefill backlog under the limit."""

    def __init__(self, kv_watermark: float = 0.01, max_prefill_backlog_tokens: int = 16384):
        self.kv_watermark = kv_watermark
        self.max_prefill_backlog_tokens = max_prefill_backlog_tokens

    def fit(self, view: ExecutorView, req: EngineRequest, hashes: list[bytes]) -> Fit | None:
        s = view.state
        if s is None:
            return None
        reserved = view.reserved.values()
        if s.num_running + s.num_waiting + len(view.reserved) >= s.max_num_seqs:
            return None
        backlog = s.prefill_backlog_tokens + sum(r[2] for r in reserved)
        prompt = len(req.prompt_token_ids) + len(req.prior_output_token_ids)
        if backlog > 0 and backlog + prompt > self.max_prefill_backlog_tokens:
            return None
        hit = view.prefix_hit_blocks(hashes)
        need = max(1, math.ceil((prompt + 1) / s.block_size) - hit)
        free = (s.num_free_blocks - math.ceil(s.prefill_backlog_tokens / s.block_size)
                - sum(r[1] for r in reserved))
        if free - need < self.kv_watermark * s.num_total_blocks:
            return None
        return Fit(view, need, hit)


class PlacementPolicy:
    """Prefers the executor that caches the longest prefix of the prompt, then the one with the
    most free blocks, then the fewest requests."""

    def choose(self, fits: list[Fit]) -> Fit | None:
        def free(f: Fit) -> int:
            return f.view.state.num_free_blocks - sum(r[1] for r in f.view.reserved.values())

        return max(fits, key=lambda f: (f.hit_blocks, free(f), -len(f.view.requests)), default=None)


def prompt_hashes(req: EngineRequest, block_size: int) -> list[bytes]:
    return hash_token_blocks(list(req.prompt_token_ids), block_size)
