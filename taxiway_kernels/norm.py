"""RMSNorm and fused residual-add + RMSNorm (HF Llama semantics; see taxiway_kernels/reference.py).

The *_quant_fp8 variants output the normalized rows in FP8 with their scales (taxiway_kernels/fp8.py),
so the next GEMM needs no separate quantization pass.

rms_norm also takes [T, H, D] views (per-head q/k norm, as Qwen3 does) with any token and head
strides; each row of D elements is normalized on its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from taxiway_kernels import _triton_compat as C
from taxiway_kernels import fp8 as F8


@triton.jit
def _normalize(x, w, n_cols, eps, out_dtype: tl.constexpr):
    """x: [R, BLOCK_N] f32 (0 beyond n_cols), w: [BLOCK_N] f32 -> w * (x * rstd).to(out_dtype)."""
    rstd = tl.rsqrt(tl.sum(x * x, 1) / n_cols + eps)
    y = (x * rstd[:, None]).to(out_dtype).to(tl.float32)
    return (y * w[None, :]).to(out_dtype)


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, n_rows, n_heads, n_cols, eps, s_xt, s_xh, s_ot, s_oh,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(n_rows, BLOCK_R),). Row r is (token r // n_heads, head r % n_heads)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_N)
    mask = (r < n_rows)[:, None] & (c < n_cols)[None, :]
    t = (r // n_heads).to(tl.int64)
    h = (r % n_heads).to(tl.int64)
    x = tl.load(x_ptr + (t * s_xt + h * s_xh)[:, None] + c[None, :], mask=mask, other=0.0)
    w = tl.load(w_ptr + c, mask=c < n_cols, other=0.0).to(tl.float32)
    y = _normalize(x.to(tl.float32), w, n_cols, eps, out_ptr.dtype.element_ty)
    tl.store(out_ptr + (t * s_ot + h * s_oh)[:, None] + c[None, :], y, mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _fused_add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, n_rows, n_cols, eps, s_x, s_r,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(n_rows, BLOCK_R),). residual += x (rounded to its dtype); x = rmsnorm(residual)."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.arange(0, BLOCK_N)
    mask = (r < n_rows)[:, None] & (c < n_cols)[None, :]
    xp = x_ptr + r[:, None] * s_x + c[None, :]
    rp = res_ptr + r[:, None] * s_r + c[None, :]
    x = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(rp, mask=mask, other=0.0).to(tl.float32)
    res = (x + res).to(res_ptr.dtype.element_ty)
    tl.store(rp, res, mask=mask)
    w = tl.load(w_ptr + c, mask=c < n_cols, other=0.0).to(tl.float32)
    tl.store(xp, _normalize(res.to(tl.float32), w, n_cols, eps, x_ptr.dtype.element_ty), mask=mask)


def _config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, num_warps): about 4k elements per program, 16-byte accesses."""
    block_n = triton.next_power_of_2(n_cols)
    block_r = max(1, min(triton.next_power_of_2(n_rows), 4096 // block_n))
    num_warps = max(1, min(16, block_r * block_n // 512))
    return block_r, block_n, num_warps


def _check_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    C.check_device("weight", weight, x.device)
    C.check_shape("weight", weight, (x.shape[-1],))
    C.check_last_dim_contiguous("weight", weight)
    if weight.dtype != x.dtype:
        raise ValueError(f"weight has dtype {weight.dtype}, expected x's dtype {x.dtype}")
    if x.shape[-1] > 65536:
        raise ValueError(f"hidden size {x.shape[-1]} is over the 65536 these kernels hold in one row")


def _as_3d(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() == 3:
        return t
    raise ValueError(f"{name} must be [T, hidden] or [T, heads, head_dim], got {tuple(t.shape)}")


def rms_norm(
    x: torch.Tensor,  # [T, N] or [T, H, N]; any token/head strides, last dim contiguous
    weight: torch.Tensor,  # [N], x's dtype
    eps: float,
    *,
    out: torch.Tensor | None = None,  # like x (out=x normalizes in place)
) -> torch.Tensor:
    """RMSNorm over the last dim in f32, cast to x's dtype, times weight (HF Llama)."""
    C.check_device("x", x, x.device)
    C.check_dtype("x", x, C.FLOAT_DTYPES)
    _check_weight(x, weight)
    out = torch.empty_like(x) if out is None else out
    C.check_device("out", out, x.device)
    C.check_shape("out", out, tuple(x.shape))
    if out.dtype != x.dtype:
        raise ValueError(f"out has dtype {out.dtype}, expected x's dtype {x.dtype}")
    x3, o3 = _as_3d("x", x), _as_3d("out", out)
    C.check_last_dim_contiguous("x", x3)
    C.check_last_dim_contiguous("out", o3)
    n_rows, n_cols = x3.shape[0] * x3.shape[1], x3.shape[2]
    if n_rows == 0:
        return out
    block_r, block_n, num_warps = _config(n_rows, n_cols)
    _rms_norm_kernel[(triton.cdiv(n_rows, block_r),)](
        x3, weight, o3, n_rows, x3.shape[1], n_cols, eps,
        x3.stride(0), x3.stride(1), o3.stride(0), o3.stride(1),
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out


def fused_add_rms_norm(
    x: torch.Tensor,  # [T, N], overwritten with the normalized result
    residual: torch.Tensor,  # [T, N], x's dtype; overwritten with x + residual
    weight: torch.Tensor,  # [N], x's dtype
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual += x; x = rms_norm(residual) * weight. Returns (x, residual)."""
    C.check_device("x", x, x.device)
    C.check_device("residual", residual, x.device)
    C.check_dtype("x", x, C.FLOAT_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, hidden], got {tuple(x.shape)}")
    C.check_shape("residual", residual, tuple(x.shape))
    if residual.dtype != x.dtype:
        raise ValueError(f"residual has dtype {residual.dtype}, expected x's dtype {x.dtype}")
    _check_weight(x, weight)
    C.check_last_dim_contiguous("x", x)
    C.check_last_dim_contiguous("residual", residual)
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return x, residual
    block_r, block_n, num_warps = _config(n_rows, n_cols)
    _fused_add_rms_norm_kernel[(triton.cdiv(n_rows, block_r),)](
        x, residual, weight, n_rows, n_cols, eps, x.stride(0), residual.stride(0),
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
    )
    return x, residual


# ---- FP8 outputs: the normalized rows quantized for the next FP8 GEMM (taxiway_kernels/fp8.py) ----

@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_fp8_kernel(
    x_ptr, res_ptr, w_ptr, q_ptr, s_ptr, static_ptr, n_rows, n_cols, eps, s_x, s_r, s_q,
    ADD: tl.constexpr, STATIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(n_rows, BLOCK_R),). ADD: residual += x first and normalize the residual (stored
    back in place); x itself is never written. The row is rounded to x's dtype, then quantized."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.arange(0, BLOCK_N)
    mask = (r < n_rows)[:, None] & (c < n_cols)[None, :]
    x = tl.load(x_ptr + r[:, None] * s_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if ADD:
        rp = res_ptr + r[:, None] * s_r + c[None, :]
        res = (x + tl.load(rp, mask=mask, other=0.0).to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(rp, res, mask=mask)
        x = res.to(tl.float32)
    w = tl.load(w_ptr + c, mask=c < n_cols, other=0.0).to(tl.float32)
    y = _normalize(x, w, n_cols, eps, x_ptr.dtype.element_ty).to(tl.float32)
    q, scale = F8._fp8_rows(y, static_ptr, STATIC)
    tl.store(q_ptr + r[:, None] * s_q + c[None, :], q, mask=mask)
    tl.store(s_ptr + r, scale, mask=r < n_rows)


def _norm_fp8(x, residual, weight, eps, static_scale):
    C.check_device("x", x, x.device)
    C.check_dtype("x", x, C.FLOAT_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, hidden], got {tuple(x.shape)}")
    _check_weight(x, weight)
    C.check_last_dim_contiguous("x", x)
    if residual is not None:
        C.check_device("residual", residual, x.device)
        C.check_shape("residual", residual, tuple(x.shape))
        if residual.dtype != x.dtype:
            raise ValueError(f"residual has dtype {residual.dtype}, expected x's dtype {x.dtype}")
        C.check_last_dim_contiguous("residual", residual)
    F8.check_static_scale(static_scale, x.device)
    n_rows, n_cols = x.shape
    q, scale = F8.new_outputs(n_rows, n_cols, x.device)
    if n_rows == 0:
        return q, scale
    block_r, block_n, num_warps = _config(n_rows, n_cols)
    res = x if residual is None else residual
    _rms_norm_fp8_kernel[(triton.cdiv(n_rows, block_r),)](
        x, res, weight, q, scale, scale if static_scale is None else static_scale, n_rows, n_cols,
        eps, x.stride(0), res.stride(0), q.stride(0), ADD=residual is not None,
        STATIC=static_scale is not None, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
    )
    return q, scale


def rms_norm_quant_fp8(
    x: torch.Tensor,  # [T, N], last dim contiguous
    weight: torch.Tensor,  # [N], x's dtype
    eps: float,
    static_scale: torch.Tensor | None = None,  # [1] f32; None = per-token scales
) -> tuple[torch.Tensor, torch.Tensor]:  # (q [T, N] float8_e4m3fn, scale [T, 1] f32)
    """rms_norm(x) quantized to FP8 in the same pass (reference: taxiway_kernels.reference.rms_norm_quant_fp8)."""
    return _norm_fp8(x, None, weight, eps, static_scale)


def fused_add_rms_norm_quant_fp8(
    x: torch.Tensor,  # [T, N], read only
    residual: torch.Tensor,  # [T, N], x's dtype; overwritten with x + residual
    weight: torch.Tensor,  # [N], x's dtype
    eps: float,
    static_scale: torch.Tensor | None = None,  # [1] f32; None = per-token scales
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (q [T, N] fp8, scale [T, 1] f32, residual)
    """residual += x; (q, scale) = FP8 of rms_norm(residual). One pass."""
    if residual is None:
        raise ValueError("residual is required (use rms_norm_quant_fp8 without one)")
    q, scale = _norm_fp8(x, residual, weight, eps, static_scale)
    return q, scale, residual
