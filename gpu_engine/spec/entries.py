"""Verify entries, scheduler side (speculative decoding): a decode holding k drafts is planned as
one entry of 1 + k tokens, and its emitted tokens are taken in with the KV past them rolled back.
Functions over the Scheduler, like gpu_engine/batch_decodes.py. No torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpu_engine.sequence import Sequence
from gpu_engine.step_plan import PENDING, SampledToken, ScheduledSeq, StepPlan

if TYPE_CHECKING:
    from gpu_engine.scheduler import Scheduler


def take_drafts(sched: "Scheduler", seq: Sequence) -> tuple[list[int], object]:
    """The sequence's drafts and their distributions, which it no longer holds."""
    drafts, probs = seq.draft_token_ids, seq.draft_probs
    if drafts:
        seq.draft_token_ids, seq.draft_probs = [], None
        if seq.slot >= 0:
            sched.batch.drafting[seq.slot] = False
    return drafts, probs


def verify_entry(sched: "Scheduler", seq: Sequence, n: int, budget: int, plan: StepPlan) -> ScheduledSeq | None:
    """A decode (n == 1) holding drafts: an entry of its last token and as many drafts as the
    budget and the free blocks take (None: plan it as a plain decode). Never preempts for drafts."""
    drafts, probs = take_drafts(sched, seq)
    k = min(len(drafts), budget - 1)
    if n != 1 or k <= 0 or seq.num_pending or not sched._grow(seq, 1 + k, plan):
        return None
    return ScheduledSeq(seq, seq.num_computed_tokens, 1 + k, True, draft_token_ids=drafts[:k],
                        draft_probs=None if probs is None else probs[:k])


def append_verified(sched: "Scheduler", entry: ScheduledSeq, samples: list[SampledToken]) -> None:
    """A verify entry's emitted tokens (accepted drafts, then one corrected or bonus token), stops
    applied token by token: the KV of the last token and the accepted drafts is kept, blocks past
    it are freed, and only blocks of accepted tokens reach the prefix cache."""
    seq = entry.seq
    drafted, accepted = len(entry.draft_token_ids), len(samples) - 1
    seq.num_draft_tokens += drafted
    seq.num_accepted_tokens += accepted
    sched.spec_stats.record(drafted, accepted)
    seq.num_computed_tokens += accepted  # commit() counted the last token only
    for j, sampled in enumerate(samples):
        if j:
            seq.token_ids.append(PENDING)
            seq.num_pending += 1
            sched.batch.tokens_changed(seq)
        sched._append(seq, sampled)
        if seq.is_finished:
            return
    keep = -(-seq.num_computed_tokens // sched.block_size)
    if len(seq.block_table) > keep:
        sched.block_manager.free(seq.block_table[keep:])
        del seq.block_table[keep:]
        sched.batch.blocks_truncated(seq)
    sched._register_full_blocks(seq)
