"""The running batch as numpy rows (the persistent batch, scheduler side). No torch.

Each running sequence owns a slot; its counters live in the slot's row (Sequence's properties read
and write them), so the scheduler plans, commits and updates thousands of decodes with a few
array operations. Slots are reused lowest-first. Changes the runner must mirror on the device are
logged here and handed over with the next plan: block-table entries written (only new ones) and
sequences that took a slot.
"""

from __future__ import annotations

import heapq

import numpy as np

from gpu_engine.sampling_params import OutputKind
from gpu_engine.sequence import Sequence


class BatchState:
    """Numpy rows over the running sequences; `check(running)` verifies them against the objects."""

    def __init__(self, capacity: int, block_size: int):
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.block_size = block_size
        n = capacity
        self.seqs = np.full(n, None, dtype=object)  # [n] Sequence | None
        self.token_lists = np.full(n, None, dtype=object)  # [n] each occupant's token_ids list
        self.num_computed = np.zeros(n, dtype=np.int64)
        self.num_pending = np.zeros(n, dtype=np.int64)
        self.num_registered = np.zeros(n, dtype=np.int64)
        self.num_tokens = np.zeros(n, dtype=np.int64)  # len(token_ids), placeholders included
        self.num_blocks = np.zeros(n, dtype=np.int64)  # len(block_table)
        self.num_prompt = np.zeros(n, dtype=np.int64)
        self.end_len = np.zeros(n, dtype=np.int64)  # prompt + max_tokens: stops ("length") there
        self.min_len = np.zeros(n, dtype=np.int64)  # prompt + min_tokens: stop tokens count beyond it
        self.special = np.zeros(n, dtype=bool)  # planned entry by entry (forks to come, prompt logprobs)
        self.drafting = np.zeros(n, dtype=bool)  # holds drafts to verify: planned as an entry
        self.maybe_shared = np.zeros(n, dtype=bool)  # its next write may hit a shared block (after a fork)
        self.watch = np.zeros(n, dtype=bool)  # reported every step (streamed output, stop strings)
        self.awaiting_first = np.zeros(n, dtype=bool)  # its request has no first-token time yet
        self.run_order = np.zeros(n, dtype=np.int64)  # when it joined the running list
        self.gen = np.zeros(n, dtype=np.int64)  # bumped for every new occupant
        self.occupied = np.zeros(n, dtype=bool)
        self._free = list(range(n))  # a heap: lowest slot first
        self._joined = 0
        self._order: np.ndarray | None = None
        self._writes: list[tuple[int, int, list[int]]] = []  # (slot, first column, blocks)
        self._bulk_writes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (slots, columns, blocks)
        self._events: list[tuple[int, Sequence | None]] = []  # (slot, new occupant or None: released)

    @property
    def num_occupied(self) -> int:
        return self.capacity - len(self._free)

    # -- occupants --------------------------------------------------------------------------------
    def assign(self, seq: Sequence) -> int:
        """Give a sequence joining the running list a slot; its counters move into the row."""
        if seq.slot >= 0:
            raise RuntimeError(f"sequence {seq.seq_id} already holds slot {seq.slot}")
        if not self._free:
            raise RuntimeError(f"all {self.capacity} batch slots are taken")
        slot = heapq.heappop(self._free)
        request = seq.request
        params = request.params
        computed, pending, registered = seq.num_computed_tokens, seq.num_pending, seq.num_registered_blocks
        self.seqs[slot] = seq
        self.token_lists[slot] = seq.token_ids
        self.num_computed[slot] = computed
        self.num_pending[slot] = pending
        self.num_registered[slot] = registered
        self.num_tokens[slot] = len(seq.token_ids)
        self.num_blocks[slot] = len(seq.block_table)
        self.num_prompt[slot] = seq.num_prompt_tokens
        self.end_len[slot] = seq.num_prompt_tokens + request.max_tokens
        self.min_len[slot] = seq.num_prompt_tokens + params.min_tokens
        self.special[slot] = (seq.index == 0 and request.pending_forks > 0) or params.prompt_logprobs is not None
        self.drafting[slot] = bool(seq.draft_token_ids)
        self.maybe_shared[slot] = False
        self.watch[slot] = params.output_kind is not OutputKind.FINAL_ONLY or bool(params.stop)
        self.awaiting_first[slot] = "first_token" not in request.metrics
        self.run_order[slot] = self._joined
        self._joined += 1
        self.gen[slot] += 1
        self.occupied[slot] = True
        seq.slot, seq._batch = slot, self
        self._order = None
        if seq.block_table:
            self._writes.append((slot, 0, list(seq.block_table)))
        self._events.append((slot, seq))
        return slot

    def release(self, seq: Sequence) -> None:
        """The sequence leaves the running list: its counters move back into the object."""
        slot = seq.slot
        if slot < 0:
            return
        seq._num_computed = int(self.num_computed[slot])
        seq._num_pending = int(self.num_pending[slot])
        seq._num_registered = int(self.num_registered[slot])
        seq.slot, seq._batch = -1, None
        self.seqs[slot] = None
        self.token_lists[slot] = None
        self.occupied[slot] = False
        self.drafting[slot] = False
        heapq.heappush(self._free, slot)
        self._order = None
        self._events.append((slot, None))

    def order(self) -> np.ndarray:
        """[N] int64: occupied slots in the order their sequences joined the running list."""
        if self._order is None:
            slots = np.flatnonzero(self.occupied)
            self._order = slots[np.argsort(self.run_order[slots], kind="stable")]
        return self._order

    # -- mirrors of the objects' lists ------------------------------------------------------------
    def blocks_appended(self, seq: Sequence, first_new: int) -> None:
        """seq.block_table grew from `first_new` on (or its entry `first_new` was replaced)."""
        slot = seq.slot
        if slot < 0:
            return
        self.num_blocks[slot] = len(seq.block_table)
        if first_new < len(seq.block_table):
            self._writes.append((slot, first_new, seq.block_table[first_new:]))

    def blocks_truncated(self, seq: Sequence) -> None:
        """seq.block_table lost its last entries (rejected drafts' blocks); nothing to mirror on
        the device: entries past the table's length are never read."""
        if seq.slot >= 0:
            self.num_blocks[seq.slot] = len(seq.block_table)

    def blocks_appended_bulk(self, slots: np.ndarray, blocks: list[int]) -> None:
        """One new block at the end of each of these slots' tables ([K] int64 slots, K blocks)."""
        cols = self.num_blocks[slots].copy()
        for seq, block in zip(self.seqs[slots].tolist(), blocks):
            seq.block_table.append(block)
        self.num_blocks[slots] = cols + 1
        self._bulk_writes.append((slots, cols, np.array(blocks, dtype=np.int64)))

    def tokens_changed(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self.num_tokens[seq.slot] = len(seq.token_ids)

    def take_changes(self) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], list[tuple[int, Sequence | None]]]:
        """Block-table writes ((slots, columns, blocks), each [K] int64) and slot events (new
        occupants, releases) since the last call, in order, for the runner's device mirror."""
        writes, self._writes = self._writes, []
        chunks, self._bulk_writes = self._bulk_writes, []
        new, self._events = self._events, []
        if writes:
            counts = [len(b) for _, _, b in writes]
            slots = np.repeat(np.array([s for s, _, _ in writes], dtype=np.int64), counts)
            firsts = np.repeat(np.array([c for _, c, _ in writes], dtype=np.int64), counts)
            starts = np.repeat(np.cumsum([0] + counts[:-1]), counts)
            cols = firsts + np.arange(len(slots), dtype=np.int64) - starts
            blocks = np.fromiter((b for _, _, bl in writes for b in bl), dtype=np.int64, count=len(slots))
            chunks.insert(0, (slots, cols, blocks))  # order matters: a later write wins
        if not chunks:
            empty = np.zeros(0, dtype=np.int64)
            return (empty, empty, empty), new
        if len(chunks) == 1:
            return chunks[0], new
        return tuple(np.concatenate(parts) for parts in zip(*chunks)), new

    # -- queries over the whole batch -------------------------------------------------------------
    def reserved_blocks(self) -> int:
        """Blocks the running sequences still need to reach end_len (their own tables only)."""
        slots = self.order()
        final = -(-self.end_len[slots] // self.block_size)
        return int(np.maximum(final - self.num_blocks[slots], 0).sum())

    def running_prefill_tokens(self) -> int:
        slots = self.order()
        left = self.num_tokens[slots] - self.num_computed[slots]
        return int(left[left > 1].sum())

    def check(self, running) -> None:
        """Every running sequence holds a slot whose row agrees with it, and no other slot is used."""
        running = list(running)
        if len(running) != self.num_occupied:
            raise AssertionError(f"{len(running)} running sequences but {self.num_occupied} slots in use")
        for seq in running:
            s = seq.slot
            if s < 0 or self.seqs[s] is not seq or not self.occupied[s]:
                raise AssertionError(f"sequence {seq.seq_id} does not own slot {s}")
            if self.num_tokens[s] != len(seq.token_ids) or self.num_blocks[s] != len(seq.block_table):
                raise AssertionError(
                    f"slot {s}: row says {self.num_tokens[s]} tokens / {self.num_blocks[s]} blocks, the "
                    f"sequence has {len(seq.token_ids)} / {len(seq.block_table)}")
            if self.num_pending[s] != sum(1 for t in seq.token_ids[-max(1, int(self.num_pending[s])):] if t < 0):
                raise AssertionError(f"slot {s}: {self.num_pending[s]} pending, placeholders disagree")


class RunningSeqs:
    """The running list in join order, with O(1) removal; joining takes a batch slot."""

    def __init__(self, batch: BatchState):
        self._seqs: dict[Sequence, None] = {}
        self._batch = batch

    def append(self, seq: Sequence) -> None:
        self._batch.assign(seq)
        self._seqs[seq] = None

    def remove(self, seq: Sequence) -> None:
        if seq not in self._seqs:
            raise ValueError(f"sequence {seq.seq_id} is not running")
        del self._seqs[seq]
        self._batch.release(seq)

    def __iter__(self):
        return iter(self._seqs)

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq) -> bool:
        return seq in self._seqs

    def __eq__(self, other) -> bool:  # compares like the list it replaces
        if isinstance(other, RunningSeqs):
            other = list(other)
        return isinstance(other, list) and list(self._seqs) == other

    __hash__ = None

    def __repr__(self) -> str:
        return f"RunningSeqs({list(self._seqs)!r})"
