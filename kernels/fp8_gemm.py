"""FP8 GEMM through torch._scaled_mm (cuBLASLt / CUTLASS on sm_89+; torch's CPU kernel elsewhere).

Reference: kernels.reference.fp8_linear. Rowwise scales: one per token of the activation ([M, 1]),
one per output channel of the weight ([N]), so per-token x per-channel and static per-tensor
schemes (a broadcast scale) all take the same call. No triton import.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")


def check_gemm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
               weight_scale: torch.Tensor) -> None:
    """The layouts torch._scaled_mm takes with rowwise scales (sm_89+)."""
    for name, t in (("x_scale", x_scale), ("weight", weight), ("weight_scale", weight_scale)):
        if t.device != xq.device:
            raise ValueError(f"{name} is on {t.device}, expected {xq.device} like xq")
    for name, t in (("xq", xq), ("weight", weight)):
        if t.dtype != FP8:
            raise ValueError(f"{name} has dtype {t.dtype}, expected {FP8}")
        if t.dim() != 2 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 2-D tensor, got shape {tuple(t.shape)} "
                             f"strides {tuple(t.stride())}")
    (m, k), (n, kw) = xq.shape, weight.shape
    if k != kw:
        raise ValueError(f"xq is [M, {k}] but weight is [{n}, {kw}]: K differs")
    if k % 16 or n % 16:
        raise ValueError(f"FP8 GEMMs need K and N multiples of 16, got K={k}, N={n}")
    _check("x_scale", x_scale, torch.float32, (m, 1))
    _check("weight_scale", weight_scale, torch.float32, (n,))


def fp8_linear(
    xq: torch.Tensor,  # [M, K] float8_e4m3fn, contiguous
    x_scale: torch.Tensor,  # [M, 1] f32
    weight: torch.Tensor,  # [N, K] float8_e4m3fn, contiguous (column-major as _scaled_mm's mat2)
    weight_scale: torch.Tensor,  # [N] f32
    bias: torch.Tensor | None = None,  # [N], out_dtype
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:  # [M, N] out_dtype
    """y = (xq * x_scale) @ (weight * weight_scale[:, None]).T + bias, accumulated in f32."""
    check_gemm(xq, x_scale, weight, weight_scale)
    # Rowwise scaling outputs bfloat16 only; other dtypes are cast from it (one small pass).
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                         out_dtype=torch.bfloat16)
    if y.dtype != out_dtype:
        y = y.to(out_dtype)
    if bias is not None:
        y += bias
    return y
