"""The model's operations on the GPU, through the Triton kernels of taxiway_kernels/ (same interface
as TorchOps)."""

from __future__ import annotations

import torch

from gpu_engine.ops import AttentionMetadata, KVScale
from gpu_engine.quant.activation import ActQuant, QuantizedActivation
from taxiway_kernels import activation, fp8, norm, rotary, triton_attention


class TritonOps:
    """Kernels only: no host reads of device values, so a decode forward can be graph-captured."""

    name = "triton"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, quant: ActQuant | None = None):
        if quant is not None:
            return QuantizedActivation(*norm.rms_norm_quant_fp8(x, weight, eps, quant.static_scale))
        return norm.rms_norm(x, weight, eps)

    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
        quant: ActQuant | None = None,
    ):
        if quant is not None:  # residual in place; x is left as it was
            q, scale, residual = norm.fused_add_rms_norm_quant_fp8(x, residual, weight, eps, quant.static_scale)
            return QuantizedActivation(q, scale), residual
        return norm.fused_add_rms_norm(x, residual, weight, eps)  # in place on both

    def silu_and_mul(self, x: torch.Tensor, quant: ActQuant | None = None):
        if quant is not None:
            return QuantizedActivation(*activation.silu_and_mul_quant_fp8(x, quant.static_scale))
        return activation.silu_and_mul(x)

    def quantize(self, x: torch.Tensor, quant: ActQuant | None):
        if quant is None:
            return x
        return QuantizedActivation(*fp8.quantize_fp8(x, quant.static_scale))

    def rope_and_write_kv(
        self, q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta: AttentionMetadata,
        kv_scale: KVScale = (1.0, 1.0),
    ) -> torch.Tensor:
        rotary.rope_and_write_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta.slot_mapping,
                                 kv_scale)
        return q

    def attention(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window,
                  kv_scale: KVScale = (1.0, 1.0), out: torch.Tensor | None = None):
        return triton_attention.paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
            out=out, sliding_window=sliding_window, num_decodes=meta.num_decodes,
            max_query_len=meta.max_query_len, kv_scale=kv_scale,
        )
