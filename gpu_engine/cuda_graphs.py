"""CUDA graphs for decode steps: captured once at start-up for a ladder of batch sizes; a step is
padded up to the next captured size and replayed. Prefill and mixed steps run eagerly."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from gpu_engine.ops import AttentionMetadata
from gpu_engine.step_inputs import padded_tables

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

    def run(self, host, feed: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Replay the graph for a decode-only batch; returns hidden states [batch, hidden].

        `feed` = (rows, tokens) on the device overrides inputs sampled by the previous step."""
        b = len(host.input_ids)
        size = self.padded_size(b)
        stage = np.zeros((4, size), dtype=np.int64)
        stage[0, :b] = host.input_ids
        stage[1, :b] = host.positions
        stage[2, :b] = host.slot_mapping
        stage[2, b:] = -1  # padding rows write nothing
        stage[3, :b] = host.seq_lens  # padding rows have length 0: attention skips them
        up = self.runner.builder.upload
        staged = up(stage)
        self.input_ids[:size].copy_(staged[0], non_blocking=True)
        self.positions[:size].copy_(staged[1], non_blocking=True)
        self.slot_mapping[:size].copy_(staged[2], non_blocking=True)
        self.seq_lens[:size].copy_(staged[3], non_blocking=True)
        tables = padded_tables(host.block_tables)
        self.block_tables[:b, : tables.shape[1]].copy_(up(tables), non_blocking=True)
        if feed is not None:
            rows, tokens = feed
            self.input_ids[rows] = tokens
        graph, out = self.graphs[size]
        graph.replay()
        return out[:b]


def decode_only(plan) -> bool:
    return bool(plan.scheduled) and plan.num_decodes == len(plan.scheduled) and not any(
        e.prompt_logprobs for e in plan.scheduled)

