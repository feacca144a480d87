"""Plain-torch references for every kernel: the CPU engine runs these, and kernel tests compare to them.

Paged KV cache layout (one pair per layer):
    k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim]
A token's slot is `block_id * block_size + offset_in_block`.

A step's batch is flattened: sequence i owns query rows query_start_loc[i]:query_start_loc[i+1]; its
new tokens are the last `q_len` of its `seq_lens[i]` context tokens, so query row j of sequence i sits
at position seq_lens[i] - q_len + j and attends (causally) to context positions 0..that position.
The new tokens' K/V are written into the cache before attention runs, so attention reads only the cache.

FP8 (E4M3): an activation is quantized to q = clamp(x / scale, ±448) with one scale per row
(amax / 448) or one static scale; a GEMM computes (q * x_scale) @ (w * w_scale).T in float32. An FP8
KV cache stores k / k_scale and v / v_scale (per-layer scales); readers multiply them back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def to_fp8(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """x / scale in E4M3, saturated at ±448 (round to nearest even). x: any shape."""
    return _div(x.float(), scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _div(x: torch.Tensor, d: float | torch.Tensor) -> torch.Tensor:
    """x / d correctly rounded on every device, as the kernels divide (tl.math.div_rn). On CUDA,
    torch divides by a Python number (or a CPU scalar) as a multiplication by its reciprocal,
    which is a last bit off now and then; by a tensor on x's device it divides."""
    if not isinstance(d, torch.Tensor):
        d = torch.full((), float(d), dtype=torch.float32, device=x.device)  # a fill, no copy: capturable
    elif d.device != x.device:
        d = d.to(x.device)
    return x / d


def quantize_fp8(
    x: torch.Tensor, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K] -> (q [T, K] float8_e4m3fn, scale [T, 1] f32): per token, or one static scale ([1] f32)."""
    xf = x.float()
    if static_scale is None:
        scale = _div(xf.abs().amax(-1, keepdim=True).clamp_min(1e-12), FP8_MAX)
    else:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    return to_fp8(xf, scale), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale in `dtype`; scale broadcasts against q ([T, 1] rows, [N, 1] channels or [1])."""
    return (q.float() * scale).to(dtype)


def fp8_linear(
    xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """(xq * x_scale) @ (weight * weight_scale[:, None]).T + bias, in float32, returned in out_dtype.

    xq: [M, K] fp8, x_scale: [M, 1] f32, weight: [N, K] fp8, weight_scale: [N] f32, bias: [N]."""
    y = (xq.float() @ weight.float().t()) * x_scale * weight_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def rms_norm_quant_fp8(
    x: torch.Tensor, weight: torch.Tensor, eps: float, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8(rms_norm(x)): the normalized row is rounded to x's dtype first."""
    return quantize_fp8(rms_norm(x, weight, eps), static_scale)


def fused_add_rms_norm_quant_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    static_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, residual') with residual' = x + residual and (q, scale) = quantize_fp8(rms_norm(residual'))."""
    normed, new_residual = fused_add_rms_norm(x, residual, weight, eps)
    q, scale = quantize_fp8(normed, static_scale)
    return q, scale, new_residual


def silu_and_mul_quant_fp8(
    x: torch.Tensor, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8(silu_and_mul(x)): the product is rounded to x's dtype first."""
    return quantize_fp8(silu_and_mul(x), static_scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32, cast back to x's dtype (as HF Llama does).

    x: [..., hidden]; weight: [hidden].
    """
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual; returns (rms_norm(residual'), residual'). Shapes [T, hidden]."""
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps), new_residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] laid out as [gate | up]; returns silu(gate) * up: [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, "rotate half" (GPT-NeoX / HF Llama) layout, over the whole head_dim.

    q: [T, H, D], k: [T, KVH, D], positions: [T] int64,
    cos_sin_cache: [max_position, D] float32 holding cos in [:, :D/2] and sin in [:, D/2:].
    Computed in float32, returned in q's dtype.
    """
    half = q.shape[-1] // 2
    cs = cos_sin_cache[positions]  # [T, D]
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: tuple[float, float] = (1.0, 1.0),
) -> None:
    """Store new tokens' K/V in the paged cache. k, v: [T, KVH, D]; slot_mapping: [T] int64.
    An FP8 cache stores k / k_scale and v / v_scale."""
    block_size = k_cache.shape[2]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    k_cache[blocks, :, offsets] = _to_cache(k, k_cache.dtype, kv_scale[0])
    v_cache[blocks, :, offsets] = _to_cache(v, v_cache.dtype, kv_scale[1])


def _to_cache(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    return to_fp8(x, scale) if dtype == FP8 else x.to(dtype)


def _from_cache(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    return (x.float() * scale).to(dtype) if x.dtype == FP8 else x.to(dtype)


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """One sequence's K or V as [KVH, seq_len, D] from its block table ([num_blocks] int)."""
    num_blocks = -(-seq_len // cache.shape[2])
    blocks = cache[block_table[:num_blocks].long()]  # [nb, KVH, bs, D]
    kvh, d = blocks.shape[1], blocks.shape[3]
    return blocks.permute(1, 0, 2, 3).reshape(kvh, -1, d)[:, :seq_len]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int] | torch.Tensor,
    seq_lens: list[int] | torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    kv_scale: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Causal attention of a mixed prefill + decode batch over the paged cache.

    q: [T, H, D]; block_tables: [num_seqs, max_blocks] int32; query_start_loc: [num_seqs + 1];
    seq_lens: [num_seqs] context length including this step's tokens. Returns [T, H, D] in q's dtype.
    With sliding_window w, a query at position p sees keys at positions > p - w (HF semantics).
    An FP8 cache is read as k * k_scale, v * v_scale (kv_scale), in q's dtype.
    """
    qsl = [int(x) for x in query_start_loc]
    lens = [int(x) for x in seq_lens]
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for i, seq_len in enumerate(lens):
        start, end = qsl[i], qsl[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k = _from_cache(gather_kv(k_cache, block_tables[i], seq_len), q.dtype, kv_scale[0])
        v = _from_cache(gather_kv(v_cache, block_tables[i], seq_len), q.dtype, kv_scale[1])
        if group > 1:
            k = k.repeat_interleave(group, dim=0)
            v = v.repeat_interleave(group, dim=0)
        qi = q[start:end].transpose(0, 1)  # [H, q_len, D]
        mask = None
        if q_len > 1 or sliding_window is not None:
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            k_pos = torch.arange(seq_len, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        out[start:end] = o.transpose(0, 1)
    return out


def rope_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: tuple[float, float] = (1.0, 1.0),
) -> None:
    """Rotate q in place and store rotated k and v in the cache; k itself is left unchanged.

    q: [T, H, D]; k, v: [T, KVH, D]; positions, slot_mapping: [T] int64 (slot -1: padding, skipped).
    """
    q_rot, k_rot = apply_rope(q, k, positions, cos_sin_cache)
    q.copy_(q_rot)
    keep = slot_mapping >= 0
    write_kv(k_rot[keep], v[keep], k_cache, v_cache, slot_mapping[keep], kv_scale)
