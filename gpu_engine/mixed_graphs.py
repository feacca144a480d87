"""CUDA graphs for prefill and mixed steps, in pieces: the forward between two attentions is
captured once per token count of a ladder, and each layer's attention runs eagerly in between.

An eager mixed step launches some 11 kernels per layer from Python: about 21 ms of host time for
Llama-3.1-8B, whatever its token count (bench/results/2026-12-04-callS2-*), more than the GPU needs
for a step of a few hundred tokens. So under Poisson arrivals, where most steps carry a new prompt,
the host set the pace. Replayed, a step costs the host the layers' attention launches, one replay
per layer and two small uploads.

What is captured for T padded rows (T >= the step's tokens, read from one static [3, T] int64
input of slot, position and host token per row, as the decode graphs read theirs):
  piece 0:     the input ids and KV slots (as a decode graph gathers them), the embedding, layer
               0 up to its attention (norm, qkv, rope, K and V written to the cache);
  piece i:     layer i - 1 after its attention (o_proj, norm, MLP), layer i up to its attention;
  piece L:     the last layer after its attention, the final norm.
With EAGLE-3 (the runner's aux_layers), the piece that ends at layer i's attention also copies the
residual stream entering layer i into a static [T, A * hidden] buffer, as Model.forward_aux keeps
it. Pieces hand over through static buffers (q, attention output, residual stream, hidden), so
nothing a later capture allocates can overlap what a replay still needs. Attention runs over the
step's rows only; padding rows have position -1 (slot -1: they write no KV) and no row mixes with
another outside attention, so they change nothing.

Not graphed: steps above the ladder's top (the setting max_mixed_graph_tokens, at most 2,048:
beyond, the GPU's time hides the host's; 0 graphs none), tensor parallelism (no graphs),
enforce_eager.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from gpu_engine.config import MAX_MIXED_GRAPH_TOKENS
from gpu_engine.cuda_graphs import capture, collection_held, row_inputs
from gpu_engine.input_batch import StepLayout
from gpu_engine.ops import AttentionMetadata


def mixed_token_ladder(max_tokens: int) -> list[int]:
    """16, 32, 48, 64, then steps of 32 to 256, of 64 to 1024, of 128 to 2048, up to max_tokens
    (at most MAX_MIXED_GRAPH_TOKENS): a step pads by fewer than 32 rows up to 256 tokens, 64 up to
    1,024, 128 beyond."""
    top = min(max_tokens, MAX_MIXED_GRAPH_TOKENS)
    sizes = ([16, 32, 48] + list(range(64, 256, 32)) + list(range(256, 1024, 64))
             + list(range(1024, MAX_MIXED_GRAPH_TOKENS + 1, 128)))
    return sorted({s for s in sizes if s < top} | {top})


class MixedGraphs:
    """The pieces of one forward per token count. A size not captured (every size on the CPU, which
    captures nothing) runs its pieces eagerly: the CPU tests check the composition that way."""

    def __init__(self, runner, max_tokens: int):
        self.runner = runner
        model = runner.model
        self.sizes = mixed_token_ladder(max_tokens)
        top, dev, dtype = self.sizes[-1], runner.device, runner.dtype
        first = model.layers[0]
        self.heads, self.head_dim = first.num_heads, model.cfg.head_dim
        hidden = model.cfg.hidden_size
        self.inputs = torch.zeros(3 * top, dtype=torch.int64, device=dev)  # [3, size] per graph
        self.positions = torch.zeros(top, dtype=torch.int64, device=dev)
        self.kv_slots = torch.full((top,), -1, dtype=torch.int64, device=dev)
        self.q = torch.zeros(top, self.heads * self.head_dim, dtype=dtype, device=dev)
        self.attn = torch.zeros_like(self.q)
        self.residual = torch.zeros(top, hidden, dtype=dtype, device=dev)
        self.hidden = torch.zeros(top, hidden, dtype=dtype, device=dev)
        # EAGLE-3: the residual stream entering each aux layer, in aux_layers' order (a layer may
        # be named twice: tiny targets clamp the default choice)
        self.aux_at: dict[int, list[int]] = {}
        for j, layer in enumerate(runner.aux_layers):
            self.aux_at.setdefault(layer, []).append(j)
        self.aux = (torch.zeros(top, len(runner.aux_layers) * hidden, dtype=dtype, device=dev)
                    if runner.aux_layers else None)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}

    def _view(self, size: int) -> torch.Tensor:
        return self.inputs[: 3 * size].view(3, size)

    def capture(self, pool=None) -> float:
        """Capture every size's pieces, largest first, in `pool` (the decode graphs'); seconds."""
        start = time.perf_counter()
        dev = self.runner.device
        with collection_held():
            for size in reversed(self.sizes):
                self._view(size)[1].fill_(-1)  # padding rows only: nothing is written
                pieces = []
                for i in range(len(self.runner.model.layers) + 1):
                    graph, _ = capture(partial(self._piece, i, size), dev, pool)
                    pool = graph.pool()
                    pieces.append(graph)
                self.graphs[size] = pieces
        torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    def padded_size(self, num_tokens: int) -> int | None:
        return next((s for s in self.sizes if s >= num_tokens), None)

    def _piece(self, i: int, size: int) -> None:
        """Piece i of the forward over `size` rows, from and into the static buffers."""
        r = self.runner
        model, layers, ops = r.model, r.model.layers, r.ops
        residual = self.residual[:size]
        if i == 0:
            slot, pos, host = self._view(size)
            self.kv_slots[:size].copy_(r.batch.slot_mapping(slot, pos))
            self.positions[:size].copy_(pos.clamp(min=0))
            hidden, stream = model.embed_tokens(r.batch.input_ids(slot, host)), None
        else:
            attn = self.attn[:size].view(size, self.heads, self.head_dim)
            hidden, stream = layers[i - 1].after_attention(attn, residual, ops)
        for j in self.aux_at.get(i, ()):  # before the layer's fused norm, which works in place
            h = hidden.shape[-1]
            self.aux[:size, j * h : (j + 1) * h].copy_(hidden if stream is None else hidden + stream)
        if i == len(layers):
            hidden, stream = ops.fused_add_rms_norm(hidden, stream, model.norm, model.cfg.rms_norm_eps)
            self.hidden[:size].copy_(hidden)
        else:
            meta = AttentionMetadata(slot_mapping=self.kv_slots[:size], query_start_loc=self.kv_slots,
                                     seq_lens=self.kv_slots, block_tables=self.kv_slots, num_decodes=0,
                                     max_query_len=0, max_seq_len=0, query_start_loc_host=[],
                                     seq_lens_host=[])  # rope and the KV write read slot_mapping only
            q, stream = layers[i].attention_inputs(hidden, stream, self.positions[:size], r.kv_caches[i],
                                                   meta, r.cos_sin, ops)
            self.q[:size].view(size, self.heads, self.head_dim).copy_(q)
        if stream.data_ptr() != residual.data_ptr():  # the first piece; the fused norms work in place
            residual.copy_(stream)

    def run(self, layout: StepLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One prefill or mixed step: (hidden [T, hidden], the rows' slots [T] int64 on the device,
        EAGLE-3's residual streams [T, A * hidden] or None), the streams a copy that the next step
        does not overwrite."""
        r = self.runner
        t, size = layout.num_tokens, self.padded_size(layout.num_tokens)
        view = self._view(size)
        r.builder.upload_into(view, row_inputs(layout, size))
        up = r.builder.upload
        meta = r.batch.attention_metadata(layout, self.kv_slots[:t], up(layout.seq_slot), up,
                                          host_lists=r.ops.name == "torch")
        pieces = self.graphs.get(size)
        layers = r.model.layers
        for i in range(len(layers) + 1):
            if pieces is None:
                self._piece(i, size)
            else:
                pieces[i].replay()
            if i < len(layers):
                layer = layers[i]
                k_cache, v_cache = r.kv_caches[i]
                r.ops.attention(self.q[:t].view(t, self.heads, self.head_dim), k_cache, v_cache, meta,
                                layer.scale, layer.cfg.sliding_window, layer.kv_scale,
                                out=self.attn[:t].view(t, self.heads, self.head_dim))
        return self.hidden[:t], view[0, :t], None if self.aux is None else self.aux[:t].clone()
