"""The one interface every proposer implements, and the batch it is given.

A step's speculating sequences are proposed for together: `propose(batch)` returns up to
`num_drafts` tokens per sequence. Proposers that keep per-sequence state (a draft model's or an
EAGLE-3 head's own paged KV cache) bring it in step with the tokens they are given at each call
(tokens they computed but that were not accepted are recomputed), and forget a sequence on
`release(seq_id)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class DraftRequest:
    """One sequence to propose for."""

    seq_id: int
    token_ids: Sequence[int]
    """Every known token: prompt, then the accepted output (no placeholders)."""
    num_drafts: int
    """Tokens to propose (0: only bring the proposer's state in step, e.g. a prefill chunk)."""
    temperature: float = 0.0
    """0: greedy drafts; > 0: drafts drawn from the draft's distribution at this temperature."""
    key: int = 0
    """row_key(seed, sample index) of the request: seeds the drafter's own draws."""
    hidden_rows: tuple[int, int, int] | None = None
    """EAGLE-3: (first row in DraftBatch.target_hidden, first position, count): the target's
    hidden states of positions first .. first + count - 1, computed this step, each position's next
    token known (for a verify step: the accepted positions only)."""


@dataclass
class DraftBatch:
    requests: list[DraftRequest]
    target_hidden: torch.Tensor | None = None
    """EAGLE-3: [R, num_aux * target_hidden] the target's auxiliary hidden states (model dtype)."""


@dataclass
class Proposal:
    token_ids: list[list[int]]
    """Per request, its drafts (at most num_drafts; fewer or none when there is nothing to propose)."""
    draft_probs: torch.Tensor | None = None
    """[sum of drafts, vocab] float32: the distribution each draft was drawn from, in order (rows
    of greedy requests are one-hot); None: every draft is a point mass (n-gram, greedy drafting)."""

    @property
    def num_drafts(self) -> list[int]:
        return [len(t) for t in self.token_ids]


class Proposer(Protocol):
    method: str

    def propose(self, batch: DraftBatch) -> Proposal: ...

    def release(self, seq_id: int) -> None: ...


SALT_DRAFT = 0x510E527F  # the drafters' own stream, apart from the target's sampling noise


def draw_drafts(
    logits: torch.Tensor,  # [S, V] float32 over the target vocabulary (-inf: not proposable)
    temperatures: torch.Tensor,  # [S] float32, 0 = greedy
    keys: torch.Tensor,  # [S] int64
    positions: torch.Tensor,  # [S] int64: absolute position of the drafted token
    any_sampled: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One draft per row: the argmax for greedy rows, a draw from softmax(logits / T) otherwise.
    Returns (tokens [S] int64, the distributions drawn from [S, V] float32 or None if all greedy)."""
    greedy = logits.argmax(dim=-1)
    if not any_sampled:
        return greedy, None
    from gpu_engine.spec.rejection import exponential_race

    temp = torch.where(temperatures > 0, temperatures, torch.ones_like(temperatures))
    q = torch.softmax(logits / temp[:, None], dim=-1)
    drawn = exponential_race(q, keys ^ SALT_DRAFT, positions)
    is_greedy = temperatures <= 0
    q = torch.where(is_greedy[:, None], torch.nn.functional.one_hot(greedy, logits.shape[-1]).float(), q)
    return torch.where(is_greedy, greedy, drawn), q
