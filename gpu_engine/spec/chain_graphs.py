"""A drafter's greedy chain as one fixed-shape program per batch size, captured as a CUDA graph.

After its eager catch-up forward, a drafter (draft model, EAGLE-3 head) proposes k tokens: k greedy
draws and k - 1 one-token forwards, each of which, run eagerly, costs the host its attention
metadata, a few uploads and tens of kernel launches (an 8B target's EAGLE-3 head spent 9.6 ms per
proposal so at batch 1, against a 4.6 ms target step: bench/results/2026-12-02-callP2-*).

Here the whole chain reads one static input and computes its metadata on the device: per row, the
block-table slot and the position of its first chain entry and how many drafts it wants, and the
rows' block tables. Entry j of a row is live while j + 1 < its drafts; a row that is not writes no
KV (slot -1) and attends to nothing (length 0), and its later draws are dropped by the caller, as
are padding rows'. So a proposal costs the host two uploads, one replay and the tokens' download.

Only greedy chains run here; a proposal with a sampled request runs the drafter's eager chain.
Without a GPU (tests) `run` executes the same program eagerly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch

from gpu_engine.cuda_graphs import batch_size_ladder, capture, collection_held
from gpu_engine.ops import AttentionMetadata
from gpu_engine.step_inputs import padded_tables

State = tuple[torch.Tensor, ...]
Greedy = Callable[[State], torch.Tensor]
"""state rows [S, ...] -> greedy draft token ids [S] int64 (target vocabulary)."""
Forward = Callable[[torch.Tensor, State, torch.Tensor, AttentionMetadata], State]
"""(tokens [S], state, positions [S] int64, metadata) -> the next state."""


class ChainGraphs:
    """The greedy chain of `steps` drafts for up to `max_rows` rows, one program per padded size.

    state_widths: (width, dtype) of each state tensor the chain carries (EAGLE-3: the head's normed
    and prenorm outputs; a draft model: its last hidden state)."""

    def __init__(self, cache, steps: int, max_rows: int, max_model_len: int,
                 state_widths: Sequence[tuple[int, torch.dtype]], greedy: Greedy, forward: Forward):
        if steps < 1 or max_rows < 1:
            raise ValueError(f"a chain needs steps >= 1 and max_rows >= 1, got {steps} and {max_rows}")
        self.cache = cache
        self.steps = steps
        self.max_len = max_model_len
        self.greedy = greedy
        self.forward = forward
        self.sizes = batch_size_ladder(max_rows)
        dev, top = cache.device, self.sizes[-1]
        self.width = -(-(max_model_len + steps) // cache.block_size)  # block-table columns
        self.rows = torch.zeros(3 * top, dtype=torch.int64, device=dev)  # [3, size]: slot, position, drafts
        self.tables = torch.zeros(top, self.width, dtype=torch.int32, device=dev)
        self.state = tuple(torch.zeros(top, w, dtype=dt, device=dev) for w, dt in state_widths)
        self.query_start_loc = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0

    @property
    def max_rows(self) -> int:
        return self.sizes[-1]

    def _view(self, size: int) -> torch.Tensor:
        return self.rows[: 3 * size].view(3, size)

    def program(self, size: int) -> torch.Tensor:
        """The chain over the first `size` rows of the static input: draft tokens [size, steps]."""
        slot0, pos0, drafts = self._view(size)
        tables = self.tables[:size]
        state = tuple(s[:size] for s in self.state)
        bs = self.cache.block_size
        host_lists = self.cache.device.type != "cuda"  # the reference ops read host lists
        tokens = []
        for j in range(self.steps):
            tok = self.greedy(state)
            tokens.append(tok)
            if j + 1 == self.steps:
                break
            live = drafts > j + 1
            idx = slot0 + j
            block = tables.gather(1, (idx // bs).clamp(max=self.width - 1)[:, None])[:, 0].to(torch.int64)
            slots = torch.where(live, block * bs + idx % bs, -1)
            seq_lens = torch.where(live, idx + 1, 0).to(torch.int32)
            meta = AttentionMetadata(
                slot_mapping=slots, query_start_loc=self.query_start_loc[: size + 1], seq_lens=seq_lens,
                block_tables=tables, num_decodes=size, max_query_len=1, max_seq_len=self.max_len,
                query_start_loc_host=list(range(size + 1)) if host_lists else [],
                seq_lens_host=seq_lens.tolist() if host_lists else [],
            )
            state = self.forward(tok, state, torch.where(live, pos0 + j, 0), meta)
        return torch.stack(tokens, dim=1)

    def capture(self) -> float:
        """Capture every size, largest first, in one memory pool; returns seconds taken."""
        start = time.perf_counter()
        pool = None
        with collection_held():
            for size in reversed(self.sizes):
                self._view(size)[2].zero_()  # no row live: nothing is written while capturing
                graph, out = capture(partial(self.program, size), self.cache.device, pool)
                pool = graph.pool()
                self.graphs[size] = (graph, out)
        torch.cuda.synchronize(self.cache.device)
        return time.perf_counter() - start

    def padded_size(self, rows: int) -> int | None:
        return next((s for s in self.sizes if s >= rows), None)

    def serves(self, works) -> bool:
        """Whether these drafters' works (each with .drafts and .req.temperature) can run here:
        all greedy, few enough rows, none wanting more drafts than the chain makes."""
        return (len(works) <= self.max_rows and all(w.req.temperature <= 0 for w in works)
                and max(w.drafts for w in works) <= self.steps)

    def run(self, state: State, seq_ids: Sequence[int], positions: Sequence[int],
            drafts: Sequence[int]) -> list[list[int]]:
        """Draft `steps` tokens for each row: its state rows, its sequence in the cache (blocks
        reserved up to its last live entry), the position of its first chain entry and its draft
        count. Returns the tokens per row (beyond a row's draft count they mean nothing)."""
        n = len(drafts)
        size = self.padded_size(n)
        if size is None:
            raise ValueError(f"{n} rows exceed the chain's {self.max_rows}")
        for dst, src in zip(self.state, state):
            dst[:n].copy_(src)
        stage = np.zeros((3, size), dtype=np.int64)
        stage[0, :n] = [p - self.cache.start(s) for s, p in zip(seq_ids, positions)]
        stage[1, :n], stage[2, :n] = positions, drafts
        self.cache.inputs.upload_into(self._view(size), stage)
        table = padded_tables([self.cache.block_table(s) for s in seq_ids])
        if table.shape[1] > self.width:
            raise ValueError(f"a block table of {table.shape[1]} blocks exceeds the chain's {self.width}")
        self.cache.inputs.upload_into(self.tables[:n, : table.shape[1]], table)
        captured = self.graphs.get(size)
        if captured is None:
            out = self.program(size)
        else:
            graph, out = captured
            graph.replay()
            self.replays += 1
        return out[:n].tolist()
