"""Triton kernels for paged attention; the checked entry points are in taxiway_kernels/triton_attention.py.

Scores are computed in base 2: the wrapper passes scale * log2(e), so softmax uses exp2.
A sliding window w arrives as `window` (a huge number when there is none): a query at position p
sees keys at positions in (p - w, p].
An FP8 cache is read in FP8 and converted in registers to DOT_DTYPE; its k_scale is folded into
scale_log2 by the wrapper and v_scale multiplies the output (both are per-layer scalars). The decode
kernel takes DOT_DTYPE float16 for an FP8 cache under 16-bit queries, and the prefill kernel
FP16_DOTS under bfloat16 ones: E4M3 -> float16 is one
instruction per pair (to bfloat16 it goes through float32, three more), every E4M3 value is exact
in float16, and q (clamped to float16's range) and p (in [0, 1]) lose nothing against bfloat16.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Per-sequence metadata read a scalar (or a few block ids) at a time: in mixed steps these are views
# at any offset (the prefill part starts after the decodes; query_start_loc and seq_lens share one
# upload), so specialising on their 16-byte alignment only compiled each kernel again while serving
# (taxiway_kernels/compile_watch.py saw 7 such compiles, 5 s of stalls, on an H200's first requests).
_ANY_OFFSET = ["bt_ptr", "qsl_ptr", "seq_lens_ptr"]


@triton.jit
def _kv_offsets(bt_row, n, valid, kv_head, s_b, s_h, s_t, BLOCK_SIZE: tl.constexpr):
    """Element offsets (int64) of the cache rows holding context positions n: [BLOCK_N]."""
    blk = tl.load(bt_row + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    return blk * s_b + kv_head * s_h + (n % BLOCK_SIZE) * s_t


@triton.jit
def _v_tile_token_major(v_ptr, bt_row, n, end, kv_head, s_vb, s_vh, s_vd, d, BLOCK_SIZE: tl.constexpr):
    """[BLOCK_N, D] V tile of context positions n (n[0] a multiple of BLOCK_SIZE) from a
    token-major V (each block's tokens contiguous per dimension): loaded as V^T [D, BLOCK_N] in
    whole-block runs, unmasked. Past `end` the run reads block 0 (the table read is masked by
    block, so a run never spans two blocks): the caller gives those positions p = 0, so every slot
    must hold a finite value."""
    col = _kv_offsets(bt_row, n, n - n % BLOCK_SIZE < end, kv_head, s_vb, s_vh, 1, BLOCK_SIZE)
    off = tl.max_contiguous(tl.multiple_of(d[:, None] * s_vd + col[None, :], [BLOCK_SIZE, BLOCK_SIZE]),
                            [1, BLOCK_SIZE])
    return tl.trans(tl.load(v_ptr + off))


@triton.jit
def _softmax_step(q, k, v, acc, l_i, m_i, keep, scale_log2,
                  APPLY_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax update. q: [M, D], k, v: [N, D], acc: [M, D] f32, l_i, m_i: [M] f32,
    keep: [M, N] bool (used only when APPLY_MASK). Rows that have seen no key keep m = -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # [M, N] f32
    if APPLY_MASK:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked row must not make NaN
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _split_range(seq_len, window, split, num_splits, BLOCK_N: tl.constexpr):
    """Decode split `split` covers context positions [start, end); chunk is a multiple of BLOCK_N."""
    kv_lo = tl.maximum(seq_len - window, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - kv_lo, num_splits), BLOCK_N) * BLOCK_N
    chunk = tl.maximum(chunk, BLOCK_N)
    start = kv_lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)
    return start, end, kv_lo, chunk


@triton.jit(do_not_specialize=["window", "num_splits"], do_not_specialize_on_alignment=_ANY_OFFSET)
def decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr, pout_ptr, plse_ptr,
    scale_log2, v_scale, window, num_splits,
    s_qt, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_vd, s_bt, s_ot, s_oh,
    NUM_HEADS: tl.constexpr, DIRECT_OUT: tl.constexpr, GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, DOT_DTYPE: tl.constexpr,
    V_TOKEN_MAJOR: tl.constexpr = False,
):
    """Grid (num_decodes, num_kv_heads, num_splits). One program: one sequence's one query token,
    the GROUP query heads that share one KV head (padded to GROUP_PAD rows for tl.dot), one split
    of its context. DIRECT_OUT (num_splits == 1) writes `out`; otherwise a normalized partial
    output pout: [S, H, num_splits, D] f32 and its base-2 log-sum-exp plse: [S, H, num_splits].
    V_TOKEN_MAJOR: V's tokens are contiguous within a block (s_vt 1, s_vd BLOCK_SIZE), read by
    _v_tile_token_major from block-aligned tiles (positions before the split's start masked): the
    dot's operand then takes consecutive tokens from one word instead of one byte load each (an
    FP8 cache)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start, end, kv_lo, chunk = _split_range(seq_len, window, split, num_splits, BLOCK_N)
    if start >= end:  # short context: this split has nothing to read
        return
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    row = tl.load(qsl_ptr + seq).to(tl.int64)
    q = tl.load(q_ptr + row * s_qt + heads[:, None] * s_qh + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)  # [GROUP_PAD, D]
    if DOT_DTYPE == tl.float16 and q.dtype != tl.float16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0)
    q = q.to(DOT_DTYPE)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * s_bt
    lo = start
    if V_TOKEN_MAJOR:  # tiles start on a block boundary (the runs below); positions before start are masked
        lo = start - start % BLOCK_SIZE
    for n0 in range(lo, end, BLOCK_N):
        if V_TOKEN_MAJOR:
            n0 = tl.multiple_of(n0, BLOCK_SIZE)
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        if V_TOKEN_MAJOR:
            valid = valid & (n >= start)
        k_off = _kv_offsets(bt_row, n, valid, kv_head, s_kb, s_kh, s_kt, BLOCK_SIZE)
        if V_TOKEN_MAJOR:  # K unmasked too: its scores at invalid positions are masked below
            k = tl.load(k_ptr + k_off[:, None] + d[None, :])
            v = _v_tile_token_major(v_ptr, bt_row, n, end, kv_head, s_vb, s_vh, s_vd, d, BLOCK_SIZE)
        else:
            v_off = _kv_offsets(bt_row, n, valid, kv_head, s_vb, s_vh, s_vt, BLOCK_SIZE)
            k = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_ptr + v_off[:, None] + d[None, :] * s_vd, mask=valid[:, None], other=0.0)
        acc, l_i, m_i = _softmax_step(q, k.to(DOT_DTYPE), v.to(DOT_DTYPE), acc, l_i, m_i,
                                      valid[None, :], scale_log2, True, DOT_PREC)
    o = acc / l_i[:, None] * v_scale
    gm = g < GROUP
    if DIRECT_OUT:
        tl.store(out_ptr + row * s_ot + heads[:, None] * s_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=gm[:, None])
    else:
        part = (seq * NUM_HEADS + heads) * num_splits + split  # [GROUP_PAD]
        tl.store(pout_ptr + part[:, None].to(tl.int64) * HEAD_DIM + d[None, :], o, mask=gm[:, None])
        tl.store(plse_ptr + part, m_i + tl.log2(l_i), mask=gm)


@triton.jit(do_not_specialize=["window", "num_splits"], do_not_specialize_on_alignment=_ANY_OFFSET[1:])
def decode_combine_kernel(
    pout_ptr, plse_ptr, qsl_ptr, seq_lens_ptr, out_ptr, window, num_splits, s_ot, s_oh,
    NUM_HEADS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (num_decodes, num_heads): merge the splits of one (sequence, head) by their LSE."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    _, _, kv_lo, chunk = _split_range(seq_len, window, 0, num_splits, BLOCK_N)
    n_used = tl.cdiv(seq_len - kv_lo, chunk)  # splits that ran, the same rule as the split kernel
    j = tl.arange(0, SPLITS_PAD)
    used = j < n_used
    base = (seq * NUM_HEADS + head) * num_splits
    lse = tl.load(plse_ptr + base + j, mask=used, other=float("-inf"))  # [SPLITS_PAD]
    m = tl.max(lse, 0)
    w = tl.where(used, tl.exp2(lse - m), 0.0)
    d = tl.arange(0, HEAD_DIM)
    parts = tl.load(pout_ptr + (base + j)[:, None].to(tl.int64) * HEAD_DIM + d[None, :],
                    mask=used[:, None], other=0.0)  # [SPLITS_PAD, D]
    denom = tl.sum(w, 0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    row = tl.load(qsl_ptr + seq).to(tl.int64)
    tl.store(out_ptr + row * s_ot + head * s_oh + d, o.to(out_ptr.dtype.element_ty))


@triton.jit
def _find_tile_seq(qsl_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Sequence s owns tiles from (qsl[s] - qsl[0]) // BLOCK_Q + s on: binary search for it."""
    q_base = tl.load(qsl_ptr)
    lo = num_seqs * 0
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = (tl.load(qsl_ptr + mid) - q_base) // BLOCK_Q + mid
        lo = tl.where(first <= tile, mid, lo)
        hi = tl.where(first <= tile, hi, mid)
    q_start = tl.load(qsl_ptr + lo)
    local_tile = tile - ((q_start - q_base) // BLOCK_Q + lo)
    return lo, q_start, local_tile


@triton.jit(do_not_specialize=["window", "num_seqs"], do_not_specialize_on_alignment=_ANY_OFFSET)
def prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr,
    scale_log2, v_scale, window, num_seqs,
    s_qt, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_vd, s_bt, s_ot, s_oh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr,
    DOT_PREC: tl.constexpr, V_TOKEN_MAJOR: tl.constexpr = False, FP16_DOTS: tl.constexpr = False,
):
    """Grid (tiles, num_kv_heads). A tile is BLOCK_Q query tokens of one sequence times the GROUP
    query heads of one KV head, packed as BLOCK_M = BLOCK_Q * GROUP (padded) rows: each K/V tile
    is read once for the whole group. Tiles wholly below the causal diagonal skip the mask.
    V_TOKEN_MAJOR: as in decode_split_kernel (under a sliding window the masked loop starts on the
    block boundary below; the window's mask drops what lies under it). FP16_DOTS (an FP8 cache
    under bfloat16 queries): q clamped to float16 and both dots in float16, as the decode kernel
    does, so E4M3 converts in one step instead of two (the loops below convert to q's dtype)."""
    seq, q_start, local_tile = _find_tile_seq(qsl_ptr, tl.program_id(0), num_seqs, BLOCK_Q)
    kv_head = tl.program_id(1)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    t0 = local_tile * BLOCK_Q
    if t0 >= q_len:  # spare program of the grid's upper bound
        return
    ctx = tl.load(seq_lens_ptr + seq) - q_len  # cached tokens before this step's
    t_last = tl.minimum(t0 + BLOCK_Q, q_len) - 1
    r = tl.arange(0, BLOCK_M)
    row_ok = (r < BLOCK_Q * GROUP) & (t0 + r // GROUP <= t_last)
    tok = tl.minimum(t0 + r // GROUP, t_last)  # padded rows repeat the last query
    heads = kv_head * GROUP + r % GROUP
    d = tl.arange(0, HEAD_DIM)
    rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * s_qt + heads[:, None] * s_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    if FP16_DOTS:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    qpos = ctx + tok  # [BLOCK_M]
    p_first = ctx + t0
    p_last = ctx + t_last
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * s_bt
    if SLIDING:
        kv_lo = tl.maximum(p_first - window + 1, 0)
        full_end = kv_lo
    else:
        kv_lo = 0
        full_end = (p_first + 1) // BLOCK_N * BLOCK_N  # every key below is seen by every row
    for n0 in range(kv_lo, full_end, BLOCK_N):  # not SLIDING here: kv_lo is 0
        if V_TOKEN_MAJOR:
            n0 = tl.multiple_of(n0, BLOCK_SIZE)
        n = n0 + tl.arange(0, BLOCK_N)
        k_off = _kv_offsets(bt_row, n, n < full_end, kv_head, s_kb, s_kh, s_kt, BLOCK_SIZE)
        k = tl.load(k_ptr + k_off[:, None] + d[None, :]).to(q.dtype)
        if V_TOKEN_MAJOR:
            v = _v_tile_token_major(v_ptr, bt_row, n, full_end, kv_head, s_vb, s_vh, s_vd, d, BLOCK_SIZE)
        else:
            v_off = _kv_offsets(bt_row, n, n < full_end, kv_head, s_vb, s_vh, s_vt, BLOCK_SIZE)
            v = tl.load(v_ptr + v_off[:, None] + d[None, :] * s_vd)
        acc, l_i, m_i = _softmax_step(q, k, v.to(q.dtype), acc, l_i, m_i, None, scale_log2, False, DOT_PREC)
    lo = full_end
    if V_TOKEN_MAJOR:
        lo = full_end - full_end % BLOCK_SIZE
    for n0 in range(lo, p_last + 1, BLOCK_N):
        if V_TOKEN_MAJOR:
            n0 = tl.multiple_of(n0, BLOCK_SIZE)
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n <= p_last
        k_off = _kv_offsets(bt_row, n, valid, kv_head, s_kb, s_kh, s_kt, BLOCK_SIZE)
        k = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if V_TOKEN_MAJOR:
            v = _v_tile_token_major(v_ptr, bt_row, n, p_last + 1, kv_head, s_vb, s_vh, s_vd, d, BLOCK_SIZE)
        else:
            v_off = _kv_offsets(bt_row, n, valid, kv_head, s_vb, s_vh, s_vt, BLOCK_SIZE)
            v = tl.load(v_ptr + v_off[:, None] + d[None, :] * s_vd, mask=valid[:, None], other=0.0)
        keep = (n[None, :] <= qpos[:, None]) & (n[None, :] > qpos[:, None] - window)
        acc, l_i, m_i = _softmax_step(q, k.to(q.dtype), v.to(q.dtype), acc, l_i, m_i, keep,
                                      scale_log2, True, DOT_PREC)
    o = acc / l_i[:, None] * v_scale
    tl.store(out_ptr + rows[:, None] * s_ot + heads[:, None] * s_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
