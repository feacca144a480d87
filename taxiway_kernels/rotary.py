"""Rotary embedding of q and k fused with writing k and v into the paged KV cache.

Reference: taxiway_kernels.reference.rope_and_write_kv (apply_rope + write_kv, slot -1 skipped).
An FP8 (E4M3) cache receives k / k_scale and v / v_scale, saturated at ±448.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from taxiway_kernels import _triton_compat as C


@triton.jit
def _rotate(ptr, rows, row_mask, i, cos, sin, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Load rows of one token ([R, D] at ptr + rows), rotate half in f32: two [R, HALF] halves."""
    mask = row_mask[:, None] & (i < HALF)[None, :]
    x1 = tl.load(ptr + rows[:, None] + i[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + rows[:, None] + HALF + i[None, :], mask=mask, other=0.0).to(tl.float32)
    return x1 * cos[None, :] - x2 * sin[None, :], x2 * cos[None, :] + x1 * sin[None, :], mask


@triton.jit
def _to_cache(x, src_dtype: tl.constexpr, cache_dtype: tl.constexpr, scale, KV_FP8: tl.constexpr):
    """Round through the source dtype first, as the reference does, then to the cache's."""
    x = x.to(src_dtype)
    if KV_FP8:
        return tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -448.0, 448.0).to(cache_dtype)  # as fp8.py
    return x.to(cache_dtype)


# positions and slot_mapping may be views at any offset (one upload holds several arrays): no
# alignment specialisation, so a step never compiles the kernel again for an odd offset.
@triton.jit(do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr, k_scale, v_scale,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_cs,
    s_kcb, s_kch, s_kct, s_vcb, s_vch, s_vct, s_vcd,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, H_PAD: tl.constexpr,
    KVH_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Grid (T,): one token's q heads rotated in place, its k rotated and v copied into the cache."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    i = tl.arange(0, HALF_PAD)
    cos = tl.load(cs_ptr + pos * s_cs + i, mask=i < HALF, other=0.0)  # [HALF_PAD] f32
    sin = tl.load(cs_ptr + pos * s_cs + HALF + i, mask=i < HALF, other=0.0)
    h = tl.arange(0, H_PAD)
    q_rows = t * s_qt + h * s_qh
    y1, y2, mask = _rotate(q_ptr, q_rows, h < NUM_HEADS, i, cos, sin, HALF, HALF_PAD)
    qo = q_ptr + q_rows[:, None] + i[None, :]
    tl.store(qo, y1.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(qo + HALF, y2.to(q_ptr.dtype.element_ty), mask=mask)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        kh = tl.arange(0, KVH_PAD)
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        k1, k2, kmask = _rotate(k_ptr, t * s_kt + kh * s_kh, kh < NUM_KV_HEADS, i, cos, sin,
                                HALF, HALF_PAD)
        kc = kc_ptr + (blk * s_kcb + off * s_kct + kh * s_kch)[:, None] + i[None, :]
        kdt = k_ptr.dtype.element_ty
        tl.store(kc, _to_cache(k1, kdt, kc_ptr.dtype.element_ty, k_scale, KV_FP8), mask=kmask)
        tl.store(kc + HALF, _to_cache(k2, kdt, kc_ptr.dtype.element_ty, k_scale, KV_FP8),
                 mask=kmask)
        d = tl.arange(0, 2 * HALF_PAD)
        vmask = (kh < NUM_KV_HEADS)[:, None] & (d < 2 * HALF)[None, :]
        v = tl.load(v_ptr + (t * s_vt + kh * s_vh)[:, None] + d[None, :], mask=vmask)
        vc = vc_ptr + (blk * s_vcb + off * s_vct + kh * s_vch)[:, None] + d[None, :] * s_vcd
        tl.store(vc, _to_cache(v, v_ptr.dtype.element_ty, vc_ptr.dtype.element_ty, v_scale, KV_FP8),
                 mask=vmask)


def _check(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping) -> None:
    dev = q.device
    tensors = dict(q=q, k=k, v=v, positions=positions, cos_sin_cache=cos_sin_cache,
                   k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    for name, t in tensors.items():
        C.check_device(name, t, dev)
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [T, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}")
    num_tokens, _, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    num_kv_heads = k.shape[1]
    C.check_shape("k", k, (num_tokens, num_kv_heads, head_dim))
    C.check_shape("v", v, (num_tokens, num_kv_heads, head_dim))
    C.check_shape("positions", positions, (num_tokens,))
    C.check_shape("slot_mapping", slot_mapping, (num_tokens,))
    C.check_dtype("positions", positions, (torch.int64,))
    C.check_dtype("slot_mapping", slot_mapping, (torch.int64,))
    C.check_dtype("cos_sin_cache", cos_sin_cache, (torch.float32,))
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(f"cos_sin_cache must be [max_position, {head_dim}], "
                         f"got {tuple(cos_sin_cache.shape)}")
    if k_cache.dim() != 4 or tuple(k_cache.shape[1:2] + k_cache.shape[3:]) != (num_kv_heads, head_dim):
        raise ValueError(f"k_cache must be [num_blocks, {num_kv_heads}, block_size, {head_dim}], "
                         f"got {tuple(k_cache.shape)}")
    C.check_shape("v_cache", v_cache, tuple(k_cache.shape))
    block_size = k_cache.shape[2]
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size (k_cache.shape[2]) must be a power of two, got {block_size}")
    for name in ("q", "k", "v"):
        C.check_dtype(name, tensors[name], C.FLOAT_DTYPES)
    for name in ("k", "v"):
        if tensors[name].dtype != q.dtype:
            raise ValueError(f"{name} has dtype {tensors[name].dtype}, expected q's dtype {q.dtype}")
    for name in ("k_cache", "v_cache"):
        C.check_dtype(name, tensors[name], C.FLOAT_DTYPES + (torch.float8_e4m3fn,))
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache has dtype {v_cache.dtype}, expected k_cache's {k_cache.dtype}")
    for name, t in tensors.items():
        if name != "v_cache":
            C.check_last_dim_contiguous(name, t)
    C.check_v_cache_layout(v_cache)


def rope_and_write_kv(
    q: torch.Tensor,  # [T, H, D], rotated in place (may be a view into a fused qkv output)
    k: torch.Tensor,  # [T, KVH, D], left unchanged; its rotation goes to k_cache
    v: torch.Tensor,  # [T, KVH, D]
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [max_position, D] f32: cos | sin
    k_cache: torch.Tensor,  # [num_blocks, KVH, block_size, D]
    v_cache: torch.Tensor,  # [num_blocks, KVH, block_size, D]; or token-major (attention reads either)
    slot_mapping: torch.Tensor,  # [T] int64, -1 = padding token, not written
    kv_scale: tuple[float, float] = (1.0, 1.0),  # (k_scale, v_scale) of an FP8 cache
) -> None:
    """Rotate q in place ("rotate half" over the whole head_dim) and store rotated k and v in
    the paged cache at slot_mapping. One program per token; any token/head strides.
    Not checked (device values): positions < max_position, slots < num_blocks * block_size."""
    _check(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    if not kv_fp8 and tuple(kv_scale) != (1.0, 1.0):
        raise ValueError(f"kv_scale {tuple(kv_scale)} given for a {k_cache.dtype} cache (only FP8 caches scale)")
    if min(kv_scale) <= 0:
        raise ValueError(f"kv_scale must be positive, got {tuple(kv_scale)}")
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    num_kv_heads = k.shape[1]
    half = head_dim // 2
    h_pad = triton.next_power_of_2(num_heads)
    _rope_write_kv_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
        float(kv_scale[0]), float(kv_scale[1]),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0), *k_cache.stride()[:3], *v_cache.stride(),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, H_PAD=h_pad,
        KVH_PAD=triton.next_power_of_2(num_kv_heads), HALF=half,
        HALF_PAD=triton.next_power_of_2(half), BLOCK_SIZE=k_cache.shape[2], KV_FP8=kv_fp8,
        num_warps=4 if h_pad * half <= 2048 else 8,
    )
