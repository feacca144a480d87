"""The scheduler's two small policies: admission ("may this waiting sequence join the running
batch?") and composition ("how many tokens does each running sequence get under the budget?")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from gpu_engine.sequence import Sequence

if TYPE_CHECKING:
    from gpu_engine.scheduler import Scheduler


class AdmissionPolicy(Protocol):
    def can_admit(self, seq: Sequence, scheduler: "Scheduler") -> bool: ...


class MaxUtilization:
    """Admit whenever blocks for the first chunk can be allocated; running out later preempts."""

    def can_admit(self, seq: Sequence, scheduler: "Scheduler") -> bool:
        return True


class GuaranteedNoEvict:
    """Admit only if prompt + max_tokens of every sample fits beside what running ones reserve.

    With the scheduler's tail_overcommit > 0: when the whole waiting queue would fit in that
    fraction of the pool beyond the reservations (the end of an offline batch, whose last
    requests would otherwise decode alone for a whole output length), admit all of it; a
    sequence that then finds no free block is preempted (recomputed) as under max_utilization."""

    def __init__(self):
        self._epoch = -1
        self._available = 0  # free blocks minus what running sequences still reserve
        self._tail = False  # this schedule() admits the whole waiting queue (tail_overcommit)

    def can_admit(self, seq: Sequence, scheduler: "Scheduler") -> bool:
        if self._epoch != scheduler.epoch:  # once per schedule(), not once per candidate
            self._epoch = scheduler.epoch
            self._available = scheduler.block_manager.num_free_blocks - self.reserved(scheduler)
            self._tail = False
        needed = self.blocks_to_finish(seq, scheduler.block_size)
        if needed > self._available and not (self._tail or self._whole_queue_fits(scheduler)):
            return False
        self._available -= needed  # admitting it reserves what it needs to finish
        return True

    def _whole_queue_fits(self, scheduler: "Scheduler") -> bool:
        """Whether every waiting request fits in tail_overcommit of the pool beyond what is
        available; summed until it does not, so a long queue costs a few entries."""
        overcommit = scheduler.config.tail_overcommit
        if overcommit <= 0:
            return False
        room = self._available + int(overcommit * scheduler.block_manager.num_blocks)
        if len(scheduler.waiting) > room:  # each needs a block at least
            return False
        for queued in scheduler.waiting:
            room -= self.blocks_to_finish(queued, scheduler.block_size)
            if room < 0:
                return False
        self._tail = True
        return True

    def reserved(self, scheduler: "Scheduler") -> int:
        """What the running sequences still need: their own tables from the batch rows, plus the
        samples still to fork (few sequences, one by one)."""
        batch = scheduler.batch
        if batch.num_occupied != len(scheduler.running):  # sequences placed by hand (tests)
            return sum(self.blocks_to_finish(s, scheduler.block_size) for s in scheduler.running)
        # A sample still writing into a block it shares with another (after a fork) needs a copy:
        # counted for each of them, an upper bound.
        total = batch.reserved_blocks() + int(batch.maybe_shared[batch.order()].sum())
        for slot in batch.order()[batch.special[batch.order()]].tolist():
            seq = batch.seqs[slot]
            total += self.blocks_to_finish(seq, scheduler.block_size) - self.own_blocks(seq, scheduler.block_size)
        return total

    @staticmethod
    def own_blocks(seq: Sequence, block_size: int) -> int:
        final_len = seq.num_prompt_tokens + seq.request.max_tokens
        return max(0, -(-final_len // block_size) - len(seq.block_table))

    @staticmethod
    def blocks_to_finish(seq: Sequence, block_size: int) -> int:
        request = seq.request
        final_len = seq.num_prompt_tokens + request.max_tokens
        total_blocks = -(-final_len // block_size)
        own = max(0, total_blocks - len(seq.block_table))
        # Forked samples share the full prompt blocks and need the rest (plus one copied block).
        forks = request.pending_forks if seq.index == 0 else 0
        return own + forks * (total_blocks - seq.num_prompt_tokens // block_size)


ADMISSION_POLICIES: dict[str, type] = {
    "max_utilization": MaxUtilization,
    "guaranteed_no_evict": GuaranteedNoEvict,
}


class DecodeFirstComposer:
    """Running decodes first, then prefill chunks (chunked prefill splits a prompt across steps)."""

    def __init__(self, chunked_prefill: bool, max_prefill_tokens_per_seq: int | None = None):
        self.chunked_prefill = chunked_prefill
        self.prefill_cap = max_prefill_tokens_per_seq if chunked_prefill else None

    def order(self, running) -> list[Sequence]:
        decodes = [s for s in running if s.num_uncomputed_tokens == 1]
        prefills = [s for s in running if s.num_uncomputed_tokens > 1]
        return decodes + prefills

    def num_tokens(self, seq: Sequence, budget: int) -> int:
        if seq.num_pending and seq.num_output_tokens >= seq.request.max_tokens:
            return 0  # its last token is being drawn: it finishes when that step is collected
        n = seq.num_uncomputed_tokens
        if self.prefill_cap is not None:
            n = min(n, self.prefill_cap)
        if n <= budget:
            return n
        return budget if self.chunked_prefill else 0
