"""What the scheduler hands the runner (StepPlan) and gets back (StepResult). No torch.

A plan keeps its plain decodes (one known-position token each, one sample, nothing else asked) as
numpy arrays over the scheduler's batch slots, so that a step with thousands of them costs no
Python object per sequence; everything else (prefill chunks, forks, prompt logprobs) is a
ScheduledSeq entry. `plan.scheduled` lists both, decodes first, for code that wants entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gpu_engine.outputs import Logprobs
from gpu_engine.sequence import Sequence

PENDING = -1
"""Placeholder token id: drawn by a launched step, not read back yet."""



def _no_ints() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


def _no_writes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _no_ints(), _no_ints(), _no_ints()


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: tokens token_ids[start:start + num_tokens]."""

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool
    """The chunk reaches the sequence's last token: sample the next one."""
    num_samples: int = 1
    """More than 1 when the request forks into its n samples at this step."""
    prompt_logprobs: bool = False
    """Return logprobs for every position of the chunk (prompt logprobs were asked for)."""
    forks: list[Sequence] = field(default_factory=list)
    """The request's other samples, created when this entry was planned (num_samples - 1 of
    them): each draws its first token from this entry's last row, in its own slot."""
    draft_token_ids: list[int] = field(default_factory=list)
    """A verify entry (speculative decoding): the k drafted tokens that follow the sequence's last
    token; the entry's num_tokens is 1 + k (the last token, then the drafts, KV written for all)
    and its result is the accepted drafts plus one corrected or bonus token."""
    draft_probs: object = None
    """[k, vocab] float32 tensor: the distribution each draft was drawn from (None: point masses)."""

    @property
    def is_verify(self) -> bool:
        return bool(self.draft_token_ids)


@dataclass
class StepPlan:
    decode_seqs: list[Sequence] = field(default_factory=list)
    """Plain decodes, in running order: one token at a known position, one sample."""
    decode_slots: np.ndarray = field(default_factory=_no_ints)  # [D] int64: their batch slots
    decode_positions: np.ndarray = field(default_factory=_no_ints)  # [D] int64: position of each input token
    decode_gens: np.ndarray = field(default_factory=_no_ints)  # [D] int64: slot generation (is it still the same sequence?)
    entries: list[ScheduledSeq] = field(default_factory=list)
    """Everything else: single-token entries first, then prefill chunks."""
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) block copies to run before the forward (copy-on-write of shared blocks)."""
    preempted: list[Sequence] = field(default_factory=list)
    table_writes: tuple[np.ndarray, np.ndarray, np.ndarray] = field(default_factory=_no_writes)
    """(slots, columns, block ids) written into the batch's block tables since the last plan."""
    slot_events: list[tuple[int, Sequence | None]] = field(default_factory=list)
    """(slot, sequence) for every sequence given a slot since the last plan, (slot, None) for every
    slot released, in order."""
    _scheduled: list[ScheduledSeq] | None = field(default=None, repr=False)

    @property
    def num_plain_decodes(self) -> int:
        return len(self.decode_seqs)

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        """Every entry, decodes first (built on first use; the hot path reads the arrays)."""
        if self._scheduled is None:
            decodes = [ScheduledSeq(s, p, 1, True) for s, p in zip(self.decode_seqs, self.decode_positions.tolist())]
            self._scheduled = decodes + self.entries
        return self._scheduled

    @property
    def num_tokens(self) -> int:
        return len(self.decode_seqs) + sum(e.num_tokens for e in self.entries)

    @property
    def num_decodes(self) -> int:
        """Leading entries of `scheduled` that are single-token decodes."""
        n = len(self.decode_seqs)
        for e in self.entries:
            if e.num_tokens != 1:
                break
            n += 1
        return n

    @property
    def is_empty(self) -> bool:
        return not self.decode_seqs and not self.entries

    def drop_decode(self, seq: Sequence) -> bool:
        """Take a plain decode out of the plan (its sequence is being preempted); False if absent."""
        for i, s in enumerate(self.decode_seqs):
            if s is seq:
                keep = np.arange(len(self.decode_seqs)) != i
                del self.decode_seqs[i]
                self.decode_slots = self.decode_slots[keep]
                self.decode_positions = self.decode_positions[keep]
                self.decode_gens = self.decode_gens[keep]
                return True
        return False


@dataclass
class SampledToken:
    token_id: int
    logprobs: Logprobs | None = None
    """The chosen token's raw logprob and the top-N (when asked for)."""


@dataclass
class StepResult:
    """A collected step, in one of two forms: per entry of `plan.scheduled` (`samples`), or packed
    (`token_ids`: one per sample row; rows are the plain decodes, then each sampling entry's
    num_samples rows, in entry order)."""

    samples: list[list[SampledToken]] | None = None
    """Per plan entry: its sampled tokens (empty when the entry does not sample)."""
    prompt_logprobs: dict[int, list[Logprobs]] = field(default_factory=dict)
    """Per index into plan.scheduled (prompt_logprobs entries): logprobs of token p+1 at each position p."""
    token_ids: np.ndarray | None = None  # [R] int64, the packed form
    logprobs: dict[int, Logprobs] = field(default_factory=dict)
    """Packed form: sample row -> the chosen token's logprob and the top-N, for rows that asked."""
    verified: dict[int, list[SampledToken]] = field(default_factory=dict)
    """Packed form: index into plan.entries of each verify entry -> its emitted tokens (accepted
    drafts, then the corrected or bonus token), in order."""
    aux_hidden: object = None
    """EAGLE-3: [T, A * hidden] tensor, the target's residual streams at the step's token rows
    (plain decodes, then each entry's tokens); None when the runner keeps none."""
