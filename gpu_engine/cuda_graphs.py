"""CUDA graphs for decode steps: captured once at start-up for a ladder of batch sizes; a step is
padded up to the next captured size and replayed. Steps of decodes and speculative verify entries
replay them too, each of an entry's 1 + k tokens as a row of its own (StepLayout.decode_rows).
Prefill and mixed steps have graphs of their own, in pieces between attentions
(gpu_engine/mixed_graphs.py).

A graph reads one static [3, size] int64 input (slot, position, host token or -1 per row) and the
persistent batch's device buffers: inside it, the input ids come from the slots' last sampled
tokens, the KV slots and block tables are gathered from the slots' tables. So a decode step costs
the host one small upload and one replay. Padding rows have position -1: they write no KV and
attend to nothing (sequence length 0).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch

from gpu_engine.input_batch import StepLayout
from gpu_engine.ops import AttentionMetadata

log = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 4096


def batch_size_ladder(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then steps of 8 to 64, of 16 to 256, of 32 to 1024, of 64 to 2048, of 128 to
    4096, up to max_num_seqs (at most 4096): a batch pads by at most 11% beyond 256 rows and 6%
    beyond 1024."""
    top = min(max_num_seqs, MAX_GRAPH_BATCH)
    sizes = ([1, 2, 4] + list(range(8, 64, 8)) + list(range(64, 256, 16)) + list(range(256, 1024, 32))
             + list(range(1024, 2048, 64)) + list(range(2048, MAX_GRAPH_BATCH + 1, 128)))
    return sorted({s for s in sizes if s < top} | {top})


@contextmanager
def collection_held() -> Iterator[None]:
    """The garbage collector held off while graphs are captured: a collection inside a capture that
    frees pinned host memory (an earlier engine's staging buffers, say) makes the host allocator
    query CUDA events, which a capture forbids. A capture failing that way ("operation failed due
    to a previous error during capture") was seen in a process building its sixth engine
    (tests/gpu/test_spec_engine_gpu.py); that this was its cause is not confirmed on a GPU yet."""
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def capture(program: Callable[[], object], device: torch.device, pool) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run `program` once (it compiles what the capture will launch), then capture it in `pool`
    (None: a new one; graph.pool() gives it). Returns (graph, what the captured run returned)."""
    program()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = program()
    return graph, out


class DecodeGraphs:
    """One captured forward per batch size, reading one static input buffer."""

    def __init__(self, runner, max_rows: int):
        self.runner = runner
        self.sizes = batch_size_ladder(max_rows)
        dev = runner.device
        max_bs = self.sizes[-1]
        self.inputs = torch.zeros(3 * max_bs, dtype=torch.int64, device=dev)  # [3, size] per graph
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        # size -> (graph, hidden [size, hidden], residual streams [size, A * hidden] or None)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor | None]] = {}
        self.pool = None
        """The memory pool of the captures (the mixed-step graphs share it: no two replay at once)."""

    def _view(self, size: int) -> torch.Tensor:
        return self.inputs[: 3 * size].view(3, size)

    def capture(self) -> float:
        """Capture every size, largest first, sharing one memory pool; returns seconds taken."""
        start = time.perf_counter()
        with collection_held():
            for size in reversed(self.sizes):
                self._view(size)[1].fill_(-1)  # capture with padding rows: nothing is written
                graph, (out, aux) = capture(partial(self._forward, size), self.runner.device, self.pool)
                self.pool = graph.pool()
                self.graphs[size] = (graph, out, aux)
        torch.cuda.synchronize(self.runner.device)
        return time.perf_counter() - start

    def _forward(self, size: int, host_lists: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward of `size` rows read from the static input (captured; host_lists gives the
        reference ops their host lists, for running it eagerly)."""
        r, batch = self.runner, self.runner.batch
        slot, pos, host = self._view(size)
        seq_lens = (pos + 1).to(torch.int32)
        meta = AttentionMetadata(
            slot_mapping=batch.slot_mapping(slot, pos), query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=seq_lens, block_tables=batch.block_table.index_select(0, slot),
            num_decodes=size, max_query_len=1, max_seq_len=r.max_model_len,
            query_start_loc_host=list(range(size + 1)) if host_lists else [],
            seq_lens_host=seq_lens.tolist() if host_lists else [],
        )
        return r.model.forward_aux(batch.input_ids(slot, host), pos.clamp(min=0), r.kv_caches, meta, r.cos_sin,
                                   r.ops, r.aux_layers)

    def padded_size(self, batch: int) -> int | None:
        for size in self.sizes:
            if size >= batch:
                return size
        return None

    def run(self, layout: StepLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replay the graph for a step of decode rows: (hidden [T, hidden], the rows' slots [T]
        int64 on the device, the residual streams [T, A * hidden] for EAGLE-3 or None: a copy, as
        the drafter reads them after the next replay may have begun)."""
        t = layout.num_tokens
        size = self.padded_size(t)
        view = self._view(size)
        self.runner.builder.upload_into(view, row_inputs(layout, size))
        out, aux = self._replay(size)
        return out[:t], view[0, :t], None if aux is None else aux[:t].clone()

    def _replay(self, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        graph, out, aux = self.graphs[size]
        graph.replay()
        return out, aux


def row_inputs(layout: StepLayout, size: int) -> np.ndarray:
    """[3, size] int64 (slot, position, host token or -1) of a step's rows, padded with rows of
    position -1 (they write no KV: their cache slot is -1)."""
    t = layout.num_tokens
    stage = np.zeros((3, size), dtype=np.int64)
    stage[0, :t] = layout.tok_slot
    stage[1, :t] = layout.tok_pos
    stage[1, t:] = -1
    stage[2, :t] = layout.host_ids
    stage[2, t:] = -1
    return stage
