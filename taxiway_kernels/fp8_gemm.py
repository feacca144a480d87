"""FP8 GEMM: torch._scaled_mm (cuBLASLt / CUTLASS on sm_89+; torch's CPU kernel elsewhere), and for
M <= SMALL_M_MAX on CUDA sm_89+ the small-M Triton kernel of taxiway_kernels/fp8_gemv.py (at decode sizes
_scaled_mm is no faster than BF16: bench/fp8_gemm.py).

Reference: taxiway_kernels.reference.fp8_linear. Rowwise scales: one per token of the activation ([M, 1]),
one per output channel of the weight ([N]), so per-token x per-channel and static per-tensor
schemes (a broadcast scale) all take the same call. No triton import at module level (the CPU
engine imports this module); taxiway_kernels.fp8_gemv is imported on the first small-M CUDA call.
"""

from __future__ import annotations

import functools

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SMALL_M_MAX = 64  # M up to this runs taxiway_kernels/fp8_gemv.py on CUDA sm_89+ (bench/fp8_gemm.py measures both)


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")


def check_gemm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
               weight_scale: torch.Tensor, any_n: bool = False) -> None:
    """The layouts torch._scaled_mm takes with rowwise scales (sm_89+); the small-M kernel takes
    any N (any_n=True)."""
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
    if k % 16 or (n % 16 and not any_n):
        need = "K a multiple of 16" if any_n else "K and N multiples of 16"
        raise ValueError(f"FP8 GEMMs need {need}, got K={k}, N={n}")
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
    if xq.is_cuda and xq.shape[0] <= SMALL_M_MAX and _has_fp8_mma(xq.device):
        from taxiway_kernels.fp8_gemv import fp8_linear_small_m

        return fp8_linear_small_m(xq, x_scale, weight, weight_scale, bias, out_dtype)
    check_gemm(xq, x_scale, weight, weight_scale)
    if out_dtype == torch.float32:
        # Rowwise scaling outputs bfloat16 only. A float32 model (correctness runs, not speed) gets
        # the exact products instead: unit tensorwise scales, a float32 output, then the scales.
        one = torch.ones((), dtype=torch.float32, device=xq.device)
        y = torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        y = y * x_scale * weight_scale[None, :]
        return y if bias is None else y + bias
    # Rowwise scaling outputs bfloat16 only; float16 is cast from it (one small pass).
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                         out_dtype=torch.bfloat16)
    if y.dtype != out_dtype:
        y = y.to(out_dtype)
    if bias is not None:
        y += bias
    return y


def _has_fp8_mma(device: torch.device) -> bool:
    """FP8 tensor-core MMA (Ada sm_89, Hopper sm_90 and later)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 9)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
