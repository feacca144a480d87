"""SiLU-and-mul: out = silu(gate) * up for x = [gate | up] (reference: kernels.reference)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _triton_compat as C


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
