"""The per-layer operations the model calls, and the step's attention metadata.

`TorchOps` runs the plain-torch references (the CPU engine, and the reference for the kernels);
`TritonOps` (gpu_engine/triton_ops.py) runs the taxiway_kernels/ package on a GPU. The model only sees
this interface, so the two are interchangeable.

Ops that feed a quantized linear take its `quant` (gpu_engine.quant.ActQuant) and then return a
QuantizedActivation (FP8 + per-row scales) instead of a tensor; with quant=None nothing changes.
Attention ops take the layer's kv_scale, used when the KV cache is FP8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_engine.quant.activation import ActQuant, QuantizedActivation
from taxiway_kernels import reference

KVScale = tuple[float, float]  # (k_scale, v_scale): an FP8 cache holds k / k_scale and v / v_scale


@dataclass
class AttentionMetadata:
    """Built once per step from the plan; every layer reads it (STYLE 11: plan once, run per layer)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token (-1: none)
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: context length including this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    num_decodes: int  # leading sequences with a single query token
    max_query_len: int
    max_seq_len: int
    query_start_loc_host: list[int]
    seq_lens_host: list[int]


class TorchOps:
    """Reference implementations in plain torch; correct on any device, fast on none."""

    name = "torch"

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, quant: ActQuant | None = None
    ) -> torch.Tensor | QuantizedActivation:
        if quant is not None:
            return QuantizedActivation(*reference.rms_norm_quant_fp8(x, weight, eps, quant.static_scale))
        return reference.rms_norm(x, weight, eps)

    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
        quant: ActQuant | None = None,
    ) -> tuple[torch.Tensor | QuantizedActivation, torch.Tensor]:
        if quant is not None:
            q, scale, residual = reference.fused_add_rms_norm_quant_fp8(x, residual, weight, eps,
                                                                        quant.static_scale)
            return QuantizedActivation(q, scale), residual
        return reference.fused_add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, x: torch.Tensor, quant: ActQuant | None = None) -> torch.Tensor | QuantizedActivation:
        if quant is not None:
            return QuantizedActivation(*reference.silu_and_mul_quant_fp8(x, quant.static_scale))
        return reference.silu_and_mul(x)

    def quantize(self, x: torch.Tensor, quant: ActQuant | None) -> torch.Tensor | QuantizedActivation:
        """x [T, K] in FP8 for a quantized linear; unchanged when quant is None."""
        if quant is None:
            return x
        return QuantizedActivation(*reference.quantize_fp8(x, quant.static_scale))

    def rope_and_write_kv(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KVH, D]
        v: torch.Tensor,  # [T, KVH, D]
        positions: torch.Tensor,  # [T] int64
        cos_sin_cache: torch.Tensor,  # [max_pos, D] float32
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        kv_scale: KVScale = (1.0, 1.0),
    ) -> torch.Tensor:
        """Rotates q and k, stores k and v in the cache (not a row of slot -1); returns the rotated q."""
        q, k = reference.apply_rope(q, k, positions, cos_sin_cache)
        keep = meta.slot_mapping >= 0
        reference.write_kv(k[keep], v[keep], k_cache, v_cache, meta.slot_mapping[keep], kv_scale)
        return q

    def attention(
        self,
        q: torch.Tensor,  # [T, H, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        kv_scale: KVScale = (1.0, 1.0),
        out: torch.Tensor | None = None,  # [T, H, D]: written and returned when given
    ) -> torch.Tensor:  # [T, H, D]
        attn = reference.paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc_host,
            meta.seq_lens_host, scale, sliding_window, kv_scale,
        )
        return attn if out is None else out.copy_(attn)


def select_ops(device: torch.device) -> TorchOps:
    """Triton kernels on a CUDA device when they import, the torch references otherwise."""
    if device.type == "cuda":
        try:
            from gpu_engine.triton_ops import TritonOps
        except ImportError:
            return TorchOps()
        return TritonOps()
    return TorchOps()
