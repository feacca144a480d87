"""A drafter's own paged KV cache (draft model, EAGLE-3 head): its blocks, from a BlockManager of
its own (with prefix caching), and per sequence which positions hold KV it can reuse.

Positions are absolute; slot i of a sequence's block table holds position start + i. A sequence
normally starts at 0; an EAGLE-3 head that never saw the target's hidden states of a cached prompt
prefix starts at the first position it has them for, and attends to what it has.

`sync` brings a sequence in step with the tokens it is given: the longest prefix of what the cache
holds that still matches is kept, the rest is recomputed (drafts the target rejected).
Only full blocks of tokens known to be final are offered to the prefix cache, and never a block
that a later call could write again, so a cached block's KV always matches its hash.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from gpu_engine.block_manager import BlockManager, hash_token_blocks
from gpu_engine.ops import AttentionMetadata
from gpu_engine.step_inputs import InputBuilder, padded_tables


_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}


def blocks_for_budget(budget_bytes: int, target_bytes_per_block: int, drafter_bytes_per_block: int) -> int:
    """How many blocks the target's cache and a drafter's own cache each get from one memory budget,
    so that both hold the same number of tokens (the drafter needs the target's context)."""
    if target_bytes_per_block <= 0 or drafter_bytes_per_block < 0:
        raise ValueError(f"bytes per block must be positive, got {target_bytes_per_block} and "
                         f"{drafter_bytes_per_block}")
    return max(0, int(budget_bytes) // (target_bytes_per_block + drafter_bytes_per_block))


@dataclass
class _SeqState:
    start: int
    block_table: list[int] = field(default_factory=list)
    held: list[int] = field(default_factory=list)
    """Key token of each slot whose KV is valid and reusable (slot i: position start + i)."""
    hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0


class DraftKVCache:
    """KV blocks of a drafter with `num_layers` layers, and which positions each sequence holds."""

    def __init__(self, num_blocks: int, block_size: int, num_layers: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device,
                 enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        shape = (num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim)
        cache = torch.zeros(shape, dtype=dtype, device=device)
        self.kv = [(cache[i, 0], cache[i, 1]) for i in range(num_layers)]
        self.device = device
        self.inputs = InputBuilder(device)
        """The drafter's uploads: pinned and non-blocking on a GPU, so that a proposal's forwards
        queue up behind each other instead of each copy waiting for the GPU (begin() / end())."""
        self._seqs: dict[int, _SeqState] = {}

    @staticmethod
    def bytes_per_block(block_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * block_size * head_dim * elem

    @contextmanager
    def staging(self):
        """Around one proposal: its uploads use the staging slot the proposal before last used."""
        self.inputs.begin_step()
        try:
            yield
        finally:
            self.inputs.end_step()

    def upload(self, values, dtype: torch.dtype) -> torch.Tensor:
        """A host list or array on the device, through the pinned staging of this proposal."""
        return self.inputs.upload(np.asarray(values, dtype=_NUMPY[dtype]))

    # -- per-sequence state -----------------------------------------------------------------------
    def start(self, seq_id: int) -> int:
        return self._seqs[seq_id].start

    def block_table(self, seq_id: int) -> list[int]:
        """The sequence's blocks; slot i (position start + i) lies in block i // block_size."""
        return self._seqs[seq_id].block_table

    def held_end(self, seq_id: int) -> int:
        s = self._seqs.get(seq_id)
        return 0 if s is None else s.start + len(s.held)

    def sync(self, seq_id: int, keys: Sequence[int], parent: bytes = b"") -> int:
        """Keep the leading held positions whose key tokens still equal `keys` (keys[p]: position
        p's key token); returns the end of that valid run (an absolute position). A sequence seen
        for the first time takes the longest cached prefix of its keys (hash chain from `parent`),
        always leaving the last key to compute."""
        state = self._seqs.get(seq_id)
        if state is None:
            state = self._seqs[seq_id] = _SeqState(start=0)
            self._acquire_prefix(state, keys, parent)
        held, off = state.held, state.start
        n = min(len(held), max(len(keys) - off, 0))
        same = 0
        while same < n and held[same] == keys[off + same]:
            same += 1
        if same < state.num_registered * self.block_size:
            raise RuntimeError(f"sequence {seq_id}: tokens before position {off + same} changed, but "
                               "they were final (their blocks are in the prefix cache)")
        del held[same:]
        return off + same

    def truncate(self, seq_id: int, end: int) -> None:
        """Hold nothing from absolute position `end` on (to recompute it)."""
        state = self._seqs[seq_id]
        keep = max(end - state.start, 0)
        if keep < state.num_registered * self.block_size:
            raise RuntimeError(f"sequence {seq_id}: position {end} lies in a block of the prefix cache")
        del state.held[keep:]

    def reset(self, seq_id: int, start: int) -> None:
        """Forget what a sequence holds; its slots restart at absolute position `start`."""
        self.release(seq_id)
        self._seqs[seq_id] = _SeqState(start=start)

    def reserve(self, seq_id: int, end: int) -> bool:
        """Blocks for every position before `end` (and none beyond); False, nothing taken, when the
        pool is short."""
        state = self._seqs[seq_id]
        need = -(-(end - state.start) // self.block_size)
        have = len(state.block_table)
        if need > have:
            got = self.blocks.allocate(need - have)
            if got is None:
                return False
            state.block_table.extend(got)
        elif need < have:
            self.blocks.free(state.block_table[need:])
            del state.block_table[need:]
            state.num_registered = min(state.num_registered, need)
        return True

    def commit(self, seq_id: int, first: int, keys: Sequence[int], final_end: int,
               parent: bytes = b"") -> None:
        """Positions first .. first + len(keys) - 1 now hold KV for these key tokens (first must be
        the valid end `sync` returned). Full blocks before `final_end` (keys known to be final and
        never recomputed) are offered to the prefix cache."""
        state = self._seqs[seq_id]
        if first != state.start + len(state.held):
            raise RuntimeError(f"commit at position {first}, but sequence {seq_id} holds up to "
                               f"{state.start + len(state.held)}")
        state.held.extend(keys)
        if state.start != 0 or not self.blocks.enable_prefix_caching:
            return
        full = min(final_end, len(state.held)) // self.block_size
        if full <= state.num_registered:
            return
        have = len(state.hashes)
        if full > have:
            prev = state.hashes[-1] if have else parent
            state.hashes.extend(hash_token_blocks(state.held[: full * self.block_size], self.block_size,
                                                  prev, have))
        for b in range(state.num_registered, full):
            self.blocks.register(state.block_table[b], state.hashes[b])
        state.num_registered = full

    def release(self, seq_id: int) -> None:
        state = self._seqs.pop(seq_id, None)
        if state is not None:
            self.blocks.free(state.block_table)

    def check_integrity(self) -> None:
        self.blocks.check_integrity()
        for seq_id, s in self._seqs.items():
            if len(s.held) > len(s.block_table) * self.block_size:
                raise AssertionError(f"sequence {seq_id} holds {len(s.held)} positions in "
                                     f"{len(s.block_table)} blocks")

    def _acquire_prefix(self, state: _SeqState, keys: Sequence[int], parent: bytes) -> None:
        usable = max(len(keys) - 1, 0) // self.block_size
        if usable == 0 or not self.blocks.enable_prefix_caching:
            return
        hashes = hash_token_blocks(list(keys[: usable * self.block_size]), self.block_size, parent)
        blocks = self.blocks.acquire_prefix(hashes)
        state.block_table = list(blocks)
        state.hashes = hashes[: len(blocks)]
        state.num_registered = len(blocks)
        state.held = list(keys[: len(blocks) * self.block_size])

    # -- a forward's inputs -----------------------------------------------------------------------
    def metadata(self, entries: list[tuple[int, int, int]]) -> tuple[AttentionMetadata, torch.Tensor]:
        """Attention metadata and positions [T] int64 for `entries` = (seq_id, first position,
        count) in batch order: each sequence's new tokens sit at positions first .. first + count - 1
        and attend to every slot before them. Reserve the blocks first."""
        bs = self.block_size
        qsl, lens, tables, positions, slots = [0], [], [], [], []
        for seq_id, first, count in entries:
            state = self._seqs[seq_id]
            slot0 = first - state.start
            table = np.asarray(state.block_table, dtype=np.int64)
            idx = np.arange(slot0, slot0 + count, dtype=np.int64)
            slots.append(table[idx // bs] * bs + idx % bs)
            positions.append(np.arange(first, first + count, dtype=np.int64))
            qsl.append(qsl[-1] + count)
            lens.append(slot0 + count)
            tables.append(state.block_table)
        num_decodes = 0
        for _, _, count in entries:
            if count != 1:
                break
            num_decodes += 1
        up = lambda a: self.inputs.upload(np.ascontiguousarray(a))  # noqa: E731
        qsl_a, lens_a = np.asarray(qsl, dtype=np.int32), np.asarray(lens, dtype=np.int32)
        meta = AttentionMetadata(
            slot_mapping=up(np.concatenate(slots)), query_start_loc=up(qsl_a), seq_lens=up(lens_a),
            block_tables=up(padded_tables(tables)), num_decodes=num_decodes,
            max_query_len=int(np.diff(qsl_a).max()), max_seq_len=int(lens_a.max()),
            query_start_loc_host=qsl, seq_lens_host=lens,
        )
        return meta, up(np.concatenate(positions))
