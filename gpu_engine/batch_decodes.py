"""The batch-wide decode path of the scheduler: every plain decode of a step (one token at a known
position, one sample) planned and updated with array operations over the BatchState rows; Python
work only for what is due for one of them (a copy-on-write, a full block to register, a stop, a
first-token time, a report). No torch.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from gpu_engine.sequence import Sequence
from gpu_engine.step_plan import SampledToken, ScheduledSeq, StepPlan, StepResult

if TYPE_CHECKING:
    from gpu_engine.scheduler import Scheduler


def plan_plain_decodes(sched: "Scheduler", plan: StepPlan, budget: int) -> list[Sequence] | None:
    """Put every plain decode into the plan's arrays; return the running sequences left for the
    one-by-one path, or None (nothing planned) when the budget or the free blocks might not
    cover the decodes, where preemption order matters."""
    b, bs = sched.batch, sched.block_size
    if len(sched.running) != b.num_occupied:
        return None  # sequences placed by hand (tests): plan them one by one
    slots = b.order()
    if not len(slots):
        return []
    tokens, computed = b.num_tokens[slots], b.num_computed[slots]
    skip = (b.num_pending[slots] > 0) & (tokens >= b.end_len[slots])  # last token being drawn
    decode = (tokens - computed == 1) & ~skip
    plain = decode & ~b.special[slots] & ~b.drafting[slots]
    new_block = plain & (computed >= b.num_blocks[slots] * bs)  # its next token starts a block
    shared = plain & b.maybe_shared[slots]  # may write into a block a fork shares: copy on write
    if int(decode.sum()) > budget or int((new_block | shared).sum()) > sched.block_manager.num_free_blocks:
        return None
    for slot in slots[shared].tolist():
        if not sched._grow(b.seqs[slot], 1, plan):
            raise AssertionError("a decode could not grow although the pool had room")
        b.maybe_shared[slot] = False  # the block it writes now is its own
    fresh = slots[new_block & ~shared]
    if len(fresh):
        b.blocks_appended_bulk(fresh, sched.block_manager.allocate(len(fresh)))
    chosen = slots[plain]
    plan.decode_slots = chosen
    plan.decode_positions = computed[plain]
    plan.decode_gens = b.gen[chosen]
    plan.decode_seqs = b.seqs[chosen].tolist()
    return sched.composer.order(b.seqs[slots[~plain & ~skip]].tolist())


def update_plain_decodes(sched: "Scheduler", plan: StepPlan, result: StepResult) -> list[Sequence]:
    """The plain decodes' tokens (rows [0, D) of the packed result), with array operations;
    sequences that left their slot since planning (preempted, finished) go one by one."""
    d = len(plan.decode_seqs)
    if not d:
        return []
    b = sched.batch
    slots, toks = plan.decode_slots, result.token_ids[:d]
    seqs = plan.decode_seqs
    same = b.occupied[slots] & (b.gen[slots] == plan.decode_gens)
    touched: list[Sequence] = []
    if not same.all():
        for i in np.flatnonzero(~same).tolist():
            touched += sched._update_entries([(ScheduledSeq(seqs[i], 0, 1, True),
                                              [SampledToken(int(toks[i]), result.logprobs.get(i))])], {}, 0)
        keep = np.flatnonzero(same)
        slots, toks, seqs = slots[keep], toks[keep], [seqs[i] for i in keep.tolist()]
        rows = keep
    else:
        rows = None
    if sched.block_manager.enable_prefix_caching:
        register_decode_blocks(sched, seqs, slots)
    pos = b.num_tokens[slots] - b.num_pending[slots]  # each one's oldest placeholder
    for tokens, p, t in zip(b.token_lists[slots].tolist(), pos.tolist(), toks.tolist()):
        tokens[p] = t
    b.num_pending[slots] -= 1
    if result.logprobs:
        index = {r: i for i, r in enumerate(rows.tolist())} if rows is not None else None
        for r, lp in result.logprobs.items():
            i = r if index is None else index.get(r)
            if i is not None and r < d:
                sched._record_logprobs(seqs[i], int(toks[i]), lp)
    first = b.awaiting_first[slots]
    if first.any():
        now = time.monotonic()
        for i in np.flatnonzero(first).tolist():
            seqs[i].request.metrics.setdefault("first_token", now)
        b.awaiting_first[slots[first]] = False
    report = b.watch[slots]
    due = ((pos + 1 >= b.end_len[slots]) | (np.isin(toks, sched._stop_ids) & (pos + 1 > b.min_len[slots])))
    for i in np.flatnonzero(due).tolist():
        sched._apply_stops(seqs[i], int(toks[i]), int(pos[i]))
    return touched + [seqs[i] for i in np.flatnonzero(report | due).tolist() if report[i] or seqs[i].is_finished]


def register_decode_blocks(sched: "Scheduler", seqs: list[Sequence], slots: np.ndarray) -> None:
    """Offer the prefix cache the blocks these decodes filled (about one sequence in block_size
    each step): counters read from the rows once for all, rather than through each sequence's
    properties: this was most of a decode step's update with prefix caching on."""
    b, bm = sched.batch, sched.block_manager
    full = np.minimum(b.num_computed[slots], b.num_tokens[slots] - b.num_pending[slots]) // sched.block_size
    due = np.flatnonzero(full > b.num_registered[slots])
    if not len(due):
        return
    for i, have, n in zip(due.tolist(), b.num_registered[slots[due]].tolist(), full[due].tolist()):
        seq = seqs[i]
        sched._extend_hashes(seq, n)
        for k in range(have, n):
            bm.register(seq.block_table[k], seq.block_hashes[k])
    b.num_registered[slots[due]] = full[due]
