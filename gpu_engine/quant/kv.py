"""The FP8 KV cache: its dtype, and the per-layer K/V scales checkpoints carry under several names."""

from __future__ import annotations

import re

import torch

# Names of the per-layer scales: compressed-tensors, ModelOpt, older fp8 exports.
_KV_SCALE_NAMES = (
    re.compile(r"model\.layers\.(\d+)\.self_attn\.(k|v)_scale"),
    re.compile(r"model\.layers\.(\d+)\.self_attn\.(k|v)_proj\.[kv]_scale"),
    re.compile(r"model\.layers\.(\d+)\.self_attn\.(k|v)_proj\.output_scale"),
)


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """EngineConfig.kv_cache_dtype -> the cache tensors' dtype ("auto": the model's)."""
    if name == "auto":
        return model_dtype
    if name == "fp8":
        return torch.float8_e4m3fn
    raise ValueError(f"kv_cache_dtype must be auto or fp8, got {name!r}")


def kv_scale_target(name: str) -> tuple[int, int] | None:
    """(layer, 0 for K / 1 for V) if `name` is a checkpoint's KV-cache scale, else None."""
    for pattern in _KV_SCALE_NAMES:
        m = pattern.fullmatch(name)
        if m:
            return int(m.group(1)), 0 if m.group(2) == "k" else 1
    return None


def scale_value(tensor: torch.Tensor, name: str) -> float:
    """A KV scale tensor ([] or [1]) as a positive float."""
    from gpu_engine.errors import ModelLoadError

    if tensor.numel() != 1:
        raise ModelLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected one value "
                             f"(a per-layer FP8 KV-cache scale)")
    value = float(tensor.float().reshape(()))
    if not value > 0 or value == float("inf"):
        raise ModelLoadError(f"tensor {name!r} = {value}: a KV-cache scale must be positive and finite")
    return value
