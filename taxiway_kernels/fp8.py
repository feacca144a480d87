"""FP8 (E4M3) activations and GEMMs (references: taxiway_kernels.reference.quantize_fp8 / fp8_linear).

    quantize_fp8(x, static_scale)   [T, K] -> (fp8 [T, K], scale [T, 1] f32), whole rows per program

The GEMM that takes these (torch._scaled_mm, rowwise scales) is taxiway_kernels/fp8_gemm.py.

An activation is quantized per token (scale = amax of its row / 448) unless a static per-tensor
scale is given, whose value is then written as every row's scale: the GEMM always takes rowwise
scales. Both divisions round correctly (tl.math.div_rn): Triton's `/` is the GPU's approximate
division, whose last-bit errors move a few codes across a rounding boundary (3 of 33.5 million at
8192 x 4096 on an H200) away from the reference's. `_fp8_rows` is the jit helper the fused norm and SiLU kernels share.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from taxiway_kernels import _triton_compat as C
from taxiway_kernels.fp8_gemm import FP8, FP8_MAX  # noqa: F401 (re-exported)


@triton.jit
def _fp8_scale(amax, static_ptr, STATIC: tl.constexpr):
    """Per-row scales [R] f32: amax / 448, or the static per-tensor scale broadcast."""
    if STATIC:
        return tl.zeros_like(amax) + tl.load(static_ptr)
    return tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)


@triton.jit
def _fp8_rows(y, static_ptr, STATIC: tl.constexpr):
    """y: [R, N] f32 (0 beyond the row) -> (q [R, N] fp8e4nv, scale [R] f32)."""
    scale = _fp8_scale(tl.max(tl.abs(y), 1), static_ptr, STATIC)
    q = tl.clamp(tl.math.div_rn(y, scale[:, None]), -448.0, 448.0).to(tl.float8e4nv)
    return q, scale


@triton.jit(do_not_specialize=["n_rows"])
def _quantize_kernel(
    x_ptr, q_ptr, s_ptr, static_ptr, n_rows, n_cols, s_x, s_q,
    STATIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(n_rows, BLOCK_R),): whole rows per program."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.arange(0, BLOCK_N)
    mask = (r < n_rows)[:, None] & (c < n_cols)[None, :]
    x = tl.load(x_ptr + r[:, None] * s_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    q, scale = _fp8_rows(x, static_ptr, STATIC)
    tl.store(q_ptr + r[:, None] * s_q + c[None, :], q, mask=mask)
    tl.store(s_ptr + r, scale, mask=r < n_rows)


def row_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, num_warps) for whole-row kernels: about 4k elements per program."""
    block_n = triton.next_power_of_2(n_cols)
    block_r = max(1, min(triton.next_power_of_2(max(n_rows, 1)), 4096 // block_n))
    return block_r, block_n, max(1, min(16, block_r * block_n // 512))


def check_static_scale(static_scale: torch.Tensor | None, device: torch.device) -> None:
    if static_scale is None:
        return
    C.check_device("static_scale", static_scale, device)
    C.check_dtype("static_scale", static_scale, (torch.float32,))
    if static_scale.numel() != 1:
        raise ValueError(f"static_scale must hold one float32 (a per-tensor scale), got shape "
                         f"{tuple(static_scale.shape)}")


def new_outputs(num_tokens: int, n_cols: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [T, N] fp8, scale [T, 1] f32), uninitialised."""
    return (torch.empty((num_tokens, n_cols), dtype=FP8, device=device),
            torch.empty((num_tokens, 1), dtype=torch.float32, device=device))


def quantize_fp8(
    x: torch.Tensor,  # [T, K] f16/bf16/f32, last dim contiguous
    static_scale: torch.Tensor | None = None,  # [1] f32: per-tensor scale; None = per token
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, K] float8_e4m3fn, [T, 1] f32)
    """q = clamp(x / scale, ±448) in E4M3 (round to nearest even) and the rows' scales."""
    C.check_device("x", x, x.device)
    C.check_dtype("x", x, C.FLOAT_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, K], got {tuple(x.shape)}")
    C.check_last_dim_contiguous("x", x)
    if x.shape[1] > 65536:
        raise ValueError(f"K = {x.shape[1]} is over the 65536 this kernel holds in one row")
    check_static_scale(static_scale, x.device)
    n_rows, n_cols = x.shape
    q, scale = new_outputs(n_rows, n_cols, x.device)
    if n_rows == 0:
        return q, scale
    block_r, block_n, num_warps = row_config(n_rows, n_cols)
    _quantize_kernel[(triton.cdiv(n_rows, block_r),)](
        x, q, scale, scale if static_scale is None else static_scale, n_rows, n_cols,
        x.stride(0), q.stride(0), STATIC=static_scale is not None, BLOCK_R=block_r,
        BLOCK_N=block_n, num_warps=num_warps,
    )
    return q, scale
