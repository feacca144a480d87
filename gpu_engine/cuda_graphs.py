"""CUDA graphs for decode steps: captured once at start-up for a ladder of batch sizes; a step is
padded up to the next captured size and replayed. Prefill and mixed steps run eagerly."""

from __future__ import annotations

import logging
import time

import torch

from gpu_engine.ops import AttentionMetadata

log = logging.getLogger(__name__)


def batch_size_ladder(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64, of 16 to 256, of 32 beyond (vLLM-like), up to max_num_seqs."""
    sizes = [1, 2, 4] + list(range(8, 64, 8)) + list(range(64, 256, 16)) + list(range(256, 1025, 32))
    ladder = [s for s in sizes if s < max_num_seqs] + [max_num_seqs]
    return sorted(set(ladder))


class DecodeGraphs:
    """Static input buffers and one captured forward per batch size."""

    def __init__(self, runner, max_num_seqs: int):
        self.runner = runner
        self.sizes = batch_size_ladder(max_num_seqs)
        dev = runner.device
        max_bs = self.sizes[-1]
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        # One pinned staging buffer: ids | positions | slots | seq_lens, uploaded with one copy.
        self._stage = torch.zeros(4, max_bs, dtype=torch.int64, pin_memory=True)
        self._tables = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, pin_memory=True)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def capture(self) -> float:
        """Capture every size, largest first, sharing one memory pool; returns seconds taken."""
        start = time.perf_counter()
        self.seq_lens.fill_(1)
        pool = None
        r = self.runner
        for size in reversed(self.sizes):
            meta = self._meta(size)
            r.model(self.input_ids[:size], self.positions[:size], r.kv_caches, meta, r.cos_sin, r.ops)
            torch.cuda.synchronize(r.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = r.model(self.input_ids[:size], self.positions[:size], r.kv_caches, meta, r.cos_sin, r.ops)
            pool = graph.pool()
            self.graphs[size] = (graph, out)
        self.seq_lens.zero_()
        torch.cuda.synchronize(r.device)
        return time.perf_counter() - start

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size], num_decodes=size,
            max_query_len=1, max_seq_len=self.runner.max_model_len,
            query_start_loc_host=[], seq_lens_host=[],
        )

    def padded_size(self, batch: int) -> int | None:
        for size in self.sizes:
            if size >= batch:
                return size
        return None

    def run(self, host) -> torch.Tensor:
        """Replay the graph for a decode-only batch; returns hidden states [batch, hidden]."""
        b = len(host.input_ids)
        size = self.padded_size(b)
        stage = self._stage.numpy()
        stage[0, :b] = host.input_ids
        stage[1, :b] = host.positions
        stage[2, :b] = host.slot_mapping
        stage[3, :b] = host.seq_lens
        stage[0:2, b:size] = 0
        stage[2, b:size] = -1
        stage[3, b:size] = 0
        tables = self._tables.numpy()
        for i, t in enumerate(host.block_tables):
            tables[i, : len(t)] = t
        width = max(len(t) for t in host.block_tables)
        self.input_ids[:size].copy_(self._stage[0, :size], non_blocking=True)
        self.positions[:size].copy_(self._stage[1, :size], non_blocking=True)
        self.slot_mapping[:size].copy_(self._stage[2, :size], non_blocking=True)
        self.seq_lens[:size].copy_(self._stage[3, :size], non_blocking=True)
        self.block_tables[:b, :width].copy_(self._tables[:b, :width], non_blocking=True)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:b]


def decode_only(plan) -> bool:
    return bool(plan.scheduled) and plan.num_decodes == len(plan.scheduled) and not any(
        e.prompt_logprobs for e in plan.scheduled)

