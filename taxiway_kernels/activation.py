"""SiLU-and-mul: out = silu(gate) * up for x = [gate | up] (reference: taxiway_kernels.reference), and its
variant that outputs FP8 with per-token scales for the down projection (taxiway_kernels/fp8.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from taxiway_kernels import _triton_compat as C
from taxiway_kernels import fp8 as F8


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, s_x, s_o, BLOCK: tl.constexpr):
    """Grid (T, cdiv(I, BLOCK)). silu is rounded to the output dtype before the product, as
    torch's F.silu(gate) * up rounds it."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < n_cols
    gate = tl.load(x_ptr + t * s_x + c, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * s_x + n_cols + c, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + t * s_o + c, (act * up).to(dtype), mask=mask)


def silu_and_mul(
    x: torch.Tensor,  # [T, 2 * I] = [gate | up]; last dim contiguous
    *,
    out: torch.Tensor | None = None,  # [T, I], x's dtype
) -> torch.Tensor:
    """silu(gate) * up, computed in f32 and rounded as torch does; returns out [T, I]."""
    C.check_device("x", x, x.device)
    C.check_dtype("x", x, C.FLOAT_DTYPES)
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be [T, 2 * intermediate], got {tuple(x.shape)}")
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = x.new_empty((num_tokens, inter)) if out is None else out
    C.check_device("out", out, x.device)
    C.check_shape("out", out, (num_tokens, inter))
    if out.dtype != x.dtype:
        raise ValueError(f"out has dtype {out.dtype}, expected x's dtype {x.dtype}")
    C.check_last_dim_contiguous("x", x)
    C.check_last_dim_contiguous("out", out)
    if num_tokens == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
        x, out, inter, x.stride(0), out.stride(0), BLOCK=block, num_warps=4,
    )
    return out


@triton.jit
def _silu_mul_chunk(x_ptr, t, s_x, c, mask, n_cols, dtype: tl.constexpr):
    """[BLOCK] f32 of silu(gate) * up at columns c, rounded to `dtype` as silu_and_mul rounds."""
    gate = tl.load(x_ptr + t * s_x + c, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * s_x + n_cols + c, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    return (act * up).to(dtype).to(tl.float32)


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, q_ptr, s_ptr, static_ptr, n_cols, s_x, s_q,
                             STATIC: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    """Grid (T,). Per-token scales need the row's amax. ONE_PASS (BLOCK covers the row): the row is
    read once and held in registers. Otherwise a first pass over the row finds the amax and the
    second recomputes the product (x read twice); a static scale needs one pass either way."""
    t = tl.program_id(0).to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    if ONE_PASS:
        c = tl.arange(0, BLOCK)
        mask = c < n_cols
        y = _silu_mul_chunk(x_ptr, t, s_x, c, mask, n_cols, dtype)
        if STATIC:
            scale = tl.load(static_ptr)
        else:
            scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(y), 0), 1e-12), 448.0)
        q = tl.clamp(tl.math.div_rn(y, scale), -448.0, 448.0).to(tl.float8e4nv)
        tl.store(q_ptr + t * s_q + c, q, mask=mask)
    else:
        if STATIC:
            scale = tl.load(static_ptr)
        else:
            amax = tl.zeros([BLOCK], tl.float32)
            for c0 in range(0, n_cols, BLOCK):
                c = c0 + tl.arange(0, BLOCK)
                y = _silu_mul_chunk(x_ptr, t, s_x, c, c < n_cols, n_cols, dtype)
                amax = tl.maximum(amax, tl.abs(y))
            scale = tl.math.div_rn(tl.maximum(tl.max(amax, 0), 1e-12), 448.0)
        for c0 in range(0, n_cols, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            mask = c < n_cols
            y = _silu_mul_chunk(x_ptr, t, s_x, c, mask, n_cols, dtype)
            q = tl.clamp(tl.math.div_rn(y, scale), -448.0, 448.0).to(tl.float8e4nv)
            tl.store(q_ptr + t * s_q + c, q, mask=mask)
    tl.store(s_ptr + t, scale)


ONE_PASS_MAX = 16384  # widest intermediate row held in registers (16 warps: 32 values a thread)


def silu_and_mul_quant_fp8(
    x: torch.Tensor,  # [T, 2 * I] = [gate | up]; last dim contiguous
    static_scale: torch.Tensor | None = None,  # [1] f32; None = per-token scales
    *,
    one_pass: bool | None = None,  # None: rows up to ONE_PASS_MAX wide in one pass (a benchmark knob)
) -> tuple[torch.Tensor, torch.Tensor]:  # (q [T, I] float8_e4m3fn, scale [T, 1] f32)
    """silu(gate) * up quantized to FP8 (reference: taxiway_kernels.reference.silu_and_mul_quant_fp8)."""
    C.check_device("x", x, x.device)
    C.check_dtype("x", x, C.FLOAT_DTYPES)
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be [T, 2 * intermediate], got {tuple(x.shape)}")
    C.check_last_dim_contiguous("x", x)
    F8.check_static_scale(static_scale, x.device)
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    q, scale = F8.new_outputs(num_tokens, inter, x.device)
    if num_tokens == 0:
        return q, scale
    if one_pass is None:
        one_pass = inter <= ONE_PASS_MAX
    elif one_pass and inter > ONE_PASS_MAX:
        raise ValueError(f"one_pass holds rows up to {ONE_PASS_MAX} wide, got {inter}")
    block = triton.next_power_of_2(inter) if one_pass else 2048
    _silu_and_mul_fp8_kernel[(num_tokens,)](
        x, q, scale, scale if static_scale is None else static_scale, inter, x.stride(0),
        q.stride(0), STATIC=static_scale is not None, BLOCK=block, ONE_PASS=one_pass,
        num_warps=max(4, min(16, block // 1024)) if one_pass else 8,
    )
    return q, scale
