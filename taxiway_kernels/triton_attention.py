"""Paged attention over the KV cache: checked entry points around taxiway_kernels/_attention_kernels.py.

    paged_attention(...)          the whole mixed batch: decodes first, then prefill chunks
    paged_decode_attention(...)   one query token per sequence, split-K (flash-decoding)
    paged_prefill_attention(...)  any number of query tokens per sequence, causal, one launch

Launches depend only on tensor shapes and on `num_splits` (a host int), never on tensor values,
so the decode path can be captured in a CUDA graph. Layouts are those of taxiway_kernels/reference.py.

An FP8 (float8_e4m3fn) cache takes kv_scale = (k_scale, v_scale): K/V are read in FP8 and
converted to q's dtype in registers (half the bytes of a 16-bit cache).

Not checked, since that would read the device: block_tables rows cover cdiv(seq_len, block_size)
blocks; 1 <= q_len <= seq_len; the first num_decodes sequences have q_len exactly 1.
"""

from __future__ import annotations

import math

import torch
import triton

from taxiway_kernels import _attention_kernels as K
from taxiway_kernels import _triton_compat as C

_NO_WINDOW = 1 << 30
_MAX_SPLITS = 64


def choose_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per decode sequence so that the split kernel has about 4 programs per SM.

    Depends only on the batch shape and the device: fixed for a captured CUDA graph.
    """
    programs = max(1, num_seqs * num_kv_heads)
    return max(1, min(_MAX_SPLITS, -(-4 * C.sm_count(device) // programs)))


def _check_common(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, window):
    """Validate the shared arguments; returns (num_seqs, group)."""
    dev = q.device
    names = ("q", "k_cache", "v_cache", "block_tables", "query_start_loc", "seq_lens", "out")
    for name, t in zip(names, (q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out)):
        C.check_device(name, t, dev)
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, num_kv_heads, block_size, head_dim], "
                         f"got shape {tuple(k_cache.shape)}")
    _, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"k_cache head_dim {cache_dim} != q head_dim {head_dim}")
    if head_dim < 16 or head_dim & (head_dim - 1) or head_dim > 256:
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")
    if block_size < 8 or block_size & (block_size - 1):
        raise ValueError(f"block_size (k_cache.shape[2]) must be a power of two >= 8, got {block_size}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    C.check_shape("v_cache", v_cache, tuple(k_cache.shape))
    C.check_dtype("q", q, C.FLOAT_DTYPES)
    if out.dtype != q.dtype:
        raise ValueError(f"out has dtype {out.dtype}, expected q's dtype {q.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in (q.dtype, torch.float8_e4m3fn):
            raise ValueError(f"{name} has dtype {t.dtype}, expected q's dtype {q.dtype} or float8_e4m3fn")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache has dtype {v_cache.dtype}, expected k_cache's {k_cache.dtype}")
    for name, t in (("q", q), ("k_cache", k_cache), ("out", out)):
        C.check_last_dim_contiguous(name, t)
    C.check_v_cache_layout(v_cache)
    C.check_shape("out", out, tuple(q.shape))
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables must be [num_seqs, max_blocks], got {tuple(block_tables.shape)}")
    num_seqs = block_tables.shape[0]
    C.check_shape("seq_lens", seq_lens, (num_seqs,))
    C.check_shape("query_start_loc", query_start_loc, (num_seqs + 1,))
    for name, t in (("block_tables", block_tables), ("query_start_loc", query_start_loc),
                    ("seq_lens", seq_lens)):
        C.check_dtype(name, t, (torch.int32,))
        C.check_last_dim_contiguous(name, t)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {window!r}")
    return num_seqs, num_heads // num_kv_heads


def _kv_scales(k_cache: torch.Tensor, kv_scale: tuple[float, float]) -> tuple[float, float]:
    k_scale, v_scale = (float(x) for x in kv_scale)
    if k_cache.dtype != torch.float8_e4m3fn and (k_scale, v_scale) != (1.0, 1.0):
        raise ValueError(f"kv_scale {(k_scale, v_scale)} given for a {k_cache.dtype} cache (only FP8 caches scale)")
    if not (k_scale > 0 and v_scale > 0):
        raise ValueError(f"kv_scale must be positive, got {(k_scale, v_scale)}")
    return k_scale, v_scale


def _check_block(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's smallest), got {value}")


def _launch_args(q, k_cache, v_cache, block_tables, out):
    strides = (q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride(),
               block_tables.stride(0), out.stride(0), out.stride(1))
    return strides, ("ieee" if q.dtype == torch.float32 else "tf32")


def _decode_dot_dtype(q: torch.Tensor, k_cache: torch.Tensor, fp8_dot_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the decode kernel's dots: q's, except for an FP8 cache under 16-bit queries."""
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8_dot_dtype is None:
        return torch.float16 if fp8 and q.dtype != torch.float32 else q.dtype
    if not fp8:
        raise ValueError(f"fp8_dot_dtype is for an FP8 cache; this cache is {k_cache.dtype}")
    if fp8_dot_dtype not in (q.dtype, torch.float16):
        raise ValueError(f"fp8_dot_dtype must be float16 or q's dtype {q.dtype}, got {fp8_dot_dtype}")
    return fp8_dot_dtype


def _decode_block_n(head_dim: int, q_dtype: torch.dtype, kv_dtype: torch.dtype, dot_dtype: torch.dtype) -> int:
    """Context tokens per decode-loop step. Measured on an H200 at T2's decode shape (250 x 3072,
    bench/results/2026-12-02-callN1-*): an FP8 cache with float16 dots reads 3.09 TB/s at 128,
    2.64 at 64 (bfloat16 dots: 2.21); a bfloat16 cache is within 2% at 32, 64 and 128."""
    if q_dtype == torch.float32 or head_dim > 128:
        return 32
    if kv_dtype == torch.float8_e4m3fn and dot_dtype == torch.float16:
        return 128
    return 64


def paged_decode_attention(
    q: torch.Tensor,  # [T, H, D]; rows query_start_loc[i] of the first num_decodes sequences
    k_cache: torch.Tensor,  # [num_blocks, KVH, block_size, D]
    v_cache: torch.Tensor,  # [num_blocks, KVH, block_size, D]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [T, H, D], q's dtype
    sliding_window: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    kv_scale: tuple[float, float] = (1.0, 1.0),
    fp8_dot_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence (q_len 1 for every sequence given).

    Split-K: each sequence's context is cut into num_splits equal chunks (multiples of block_n
    tokens); partial results are merged by log-sum-exp. CUDA-graph capturable.
    block_n, num_warps and num_stages are tuning knobs (bench/kernels_sweep.py), and so is
    fp8_dot_dtype: what an FP8 cache is converted to for the dots (default float16 under 16-bit
    queries, see taxiway_kernels/_attention_kernels.py; q's dtype is the other choice).
    v_cache may also be token-major (each block stored [head_dim, block_size] and passed as
    `.transpose(2, 3)` of that): the kernel then reads it unmasked, so every slot of every block
    must hold a finite value (a cache allocated zeroed and written by the KV kernels does).
    """
    out = torch.empty_like(q) if out is None else out
    num_seqs, group = _check_common(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                                    out, sliding_window)
    k_scale, v_scale = _kv_scales(k_cache, kv_scale)
    if num_seqs == 0:
        return out
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, q.device)
    if not 1 <= num_splits <= 256:
        raise ValueError(f"num_splits must be in [1, 256], got {num_splits}")
    dot_dtype = _decode_dot_dtype(q, k_cache, fp8_dot_dtype)
    block_n = block_n or _decode_block_n(head_dim, q.dtype, k_cache.dtype, dot_dtype)
    _check_block("block_n", block_n)
    window = sliding_window or _NO_WINDOW
    strides, prec = _launch_args(q, k_cache, v_cache, block_tables, out)
    # [num_seqs, H, num_splits, D] f32 and [num_seqs, H, num_splits] f32: per-split results.
    pout = q.new_empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32)
    plse = q.new_empty((num_seqs, num_heads, num_splits), dtype=torch.float32)
    scale_log2 = scale * k_scale * math.log2(math.e)
    K.decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, pout, plse,
        scale_log2, v_scale, window, num_splits, *strides,
        NUM_HEADS=num_heads, DIRECT_OUT=num_splits == 1, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, DOT_PREC=prec, DOT_DTYPE=C.tl_dtype(dot_dtype),
        V_TOKEN_MAJOR=C.v_token_major(v_cache), num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        K.decode_combine_kernel[(num_seqs, num_heads)](
            pout, plse, query_start_loc, seq_lens, out, window, num_splits, out.stride(0),
            out.stride(1), NUM_HEADS=num_heads,
            SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, BLOCK_N=block_n,
            num_warps=4 if head_dim * num_splits >= 2048 else 2,
        )
    return out


def _prefill_config(head_dim: int, group: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the prefill kernel on Hopper.

    float32 (tests only) takes an exact FMA dot: smaller tiles keep it out of local memory."""
    if dtype == torch.float32:
        return max(32, triton.next_power_of_2(group)), 32, 4, 2
    if head_dim <= 128:
        block_m = 128 if group <= 16 else triton.next_power_of_2(group)
        return block_m, 64, 8, 3
    return max(64, triton.next_power_of_2(group)), 32, 8, 2


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, KVH, block_size, D]
    v_cache: torch.Tensor,  # [num_blocks, KVH, block_size, D]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [T, H, D], q's dtype
    sliding_window: int | None = None,
    num_query_tokens: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    kv_scale: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Causal attention of every sequence's new tokens to its cached prefix and to themselves.

    One launch for the batch; `num_query_tokens` (default T) bounds the query rows these
    sequences own, so the grid is floor(num_query_tokens / BLOCK_Q) + num_seqs tiles per KV head.
    block_m (query rows: BLOCK_Q tokens x group heads), block_n, num_warps and num_stages are
    tuning knobs (bench/kernels_sweep.py); None takes _prefill_config's choice.
    """
    out = torch.empty_like(q) if out is None else out
    num_seqs, group = _check_common(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                                    out, sliding_window)
    k_scale, v_scale = _kv_scales(k_cache, kv_scale)
    if num_seqs == 0:
        return out
    head_dim, num_kv_heads = q.shape[2], k_cache.shape[1]
    cfg_m, cfg_n, cfg_warps, cfg_stages = _prefill_config(head_dim, group, q.dtype)
    block_m, block_n = block_m or cfg_m, block_n or cfg_n
    num_warps, num_stages = num_warps or cfg_warps, num_stages or cfg_stages
    if block_m < group or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= max(16, group={group}), got {block_m}")
    _check_block("block_n", block_n)
    block_q = block_m // group
    tokens = q.shape[0] if num_query_tokens is None else num_query_tokens
    strides, prec = _launch_args(q, k_cache, v_cache, block_tables, out)
    grid = (tokens // block_q + num_seqs, num_kv_heads)
    K.prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out,
        scale * k_scale * math.log2(math.e), v_scale, sliding_window or _NO_WINDOW, num_seqs,
        *strides,
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[2], BLOCK_N=block_n, SLIDING=sliding_window is not None,
        DOT_PREC=prec, V_TOKEN_MAJOR=C.v_token_major(v_cache),
        FP16_DOTS=k_cache.dtype == torch.float8_e4m3fn and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, KVH, block_size, D]
    v_cache: torch.Tensor,  # [num_blocks, KVH, block_size, D]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [T, H, D], q's dtype
    sliding_window: int | None = None,
    num_decodes: int = 0,
    max_query_len: int | None = None,
    num_splits: int | None = None,
    kv_scale: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Mixed batch, same meaning as taxiway_kernels.reference.paged_attention.

    The first `num_decodes` sequences must have q_len 1 (not checked: that would read the
    device); they go to the split-K decode kernel, the rest to the prefill kernel. With
    max_query_len == 1 every sequence is a decode. num_decodes = 0 is always correct, only slower.
    """
    out = torch.empty_like(q) if out is None else out
    num_seqs = block_tables.shape[0]
    if max_query_len == 1:
        num_decodes = num_seqs
    if not 0 <= num_decodes <= num_seqs:
        raise ValueError(f"num_decodes must be in [0, num_seqs={num_seqs}], got {num_decodes}")
    if num_decodes > 0:
        paged_decode_attention(
            q, k_cache, v_cache, block_tables[:num_decodes], query_start_loc[: num_decodes + 1],
            seq_lens[:num_decodes], scale, out=out, sliding_window=sliding_window,
            num_splits=num_splits, kv_scale=kv_scale)
    if num_decodes < num_seqs:
        paged_prefill_attention(
            q, k_cache, v_cache, block_tables[num_decodes:], query_start_loc[num_decodes:],
            seq_lens[num_decodes:], scale, out=out, sliding_window=sliding_window,
            num_query_tokens=q.shape[0] - num_decodes, kv_scale=kv_scale)
    return out
