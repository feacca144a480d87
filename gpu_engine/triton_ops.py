"""The model's operations on the GPU, through the Triton kernels of kernels/ (same interface as TorchOps)."""

from __future__ import annotations

import torch

from gpu_engine.ops import AttentionMetadata
from kernels import activation, norm, rotary, triton_attention


class TritonOps:
    """Kernels only: no host reads of device values, so a decode forward can be graph-captured."""

    name = "triton"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return norm.rms_norm(x, weight, eps)

    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return norm.fused_add_rms_norm(x, residual, weight, eps)  # in place on both

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return activation.silu_and_mul(x)

    def rope_and_write_kv(
        self, q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta: AttentionMetadata
    ) -> torch.Tensor:
        rotary.rope_and_write_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta.slot_mapping)
        return q

    def attention(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window):
        return triton_attention.paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
            sliding_window=sliding_window, num_decodes=meta.num_decodes, max_query_len=meta.max_query_len,
        )
