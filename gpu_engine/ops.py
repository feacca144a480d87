"""The per-layer operations the model calls, and the step's attention metadata.

`TorchOps` runs the plain-torch references (the CPU engine, and the reference for the kernels);
`TritonOps` (gpu_engine/triton_ops.py) runs the kernels/ package on a GPU. The model only sees
this interface, so the two are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import reference


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

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return reference.rms_norm(x, weight, eps)

    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return reference.fused_add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return reference.silu_and_mul(x)

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
    ) -> torch.Tensor:
        """Rotates q and k, stores k and v in the cache; returns the rotated q."""
        q, k = reference.apply_rope(q, k, positions, cos_sin_cache)
        reference.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return q

    def attention(
        self,
        q: torch.Tensor,  # [T, H, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:  # [T, H, D]
        return reference.paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc_host,
            meta.seq_lens_host, scale, sliding_window,
        )


def select_ops(device: torch.device) -> TorchOps:
    """Triton kernels on a CUDA device when they import, the torch references otherwise."""
    if device.type == "cuda":
        try:
            from gpu_engine.triton_ops import TritonOps
        except ImportError:
            return TorchOps()
        return TritonOps()
    return TorchOps()
