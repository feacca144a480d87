"""Triton kernels of token sampling, second half: the exact threshold inside the band (or over the
whole row), the token, the record into the slot, and the processed distribution.

See taxiway_kernels/_sampling_kernels.py for the passes before these and the helpers they share.
"""

from __future__ import annotations

import triton
import triton.language as tl

from taxiway_kernels._sampling_kernels import (  # noqa: F401  (constexprs and helpers the kernels use)
    NEG,
    PER_STEP,
    POS,
    TOP_K,
    TOP_P,
    MIN_P,
    FILTERS,
    NUM_I,
    I_POS,
    GF,
    GI,
    RF,
    RI,
    _row_ctx,
    _scores,
    _gumbel,
    _race_update,
    _key,
    _unkey,
    _chunk_offsets,
    _combine_stats,
    _filter_ctx,
)


@triton.jit
def _scan(where_, rows, qs, safe, MASS: tl.constexpr, STRICT: tl.constexpr, FROM_BAND: tl.constexpr,
          BLK: tl.constexpr, MAX_STOP: tl.constexpr):
    """For thresholds qs [BR, NQ]: the count (MASS False) or sum of exp(s - safe) (MASS True) of
    the scores > q (STRICT) or >= q, [BR, NQ] float32 (counts are exact below 2^24). Over the band
    buffer, where_ = (bufv, CAP, n, nmax), or the whole row, where_ = (src, slot, pen, rmask)."""
    acc = tl.zeros(qs.shape, tl.float32)
    if FROM_BAND:
        bufv, CAP, n, nmax = where_
        for b0 in range(0, nmax, BLK):
            j = b0 + tl.arange(0, BLK)
            msk = j[None, :] < n[:, None]
            s = tl.load(bufv + rows.to(tl.int64)[:, None] * CAP + j[None, :], mask=msk, other=NEG)
            acc += _tally(s, qs, safe, MASS, STRICT)
    else:
        src, slot, pen, rmask = where_
        for start in range(0, src[4], BLK):
            s = _scores(src, rows, start + tl.arange(0, BLK), rmask, slot, pen, MAX_STOP)
            acc += _tally(s, qs, safe, MASS, STRICT)
    return acc


@triton.jit
def _tally(s, qs, safe, MASS: tl.constexpr, STRICT: tl.constexpr):
    """s [BR, BLK] (-inf = absent) against qs [BR, NQ] -> [BR, NQ]."""
    if STRICT:
        hit = s[:, :, None] > qs[:, None, :]
    else:
        hit = s[:, :, None] >= qs[:, None, :]
    if MASS:
        return tl.sum(tl.where(hit, tl.exp(s - safe[:, None])[:, :, None], 0.0), 1)
    return tl.sum(hit.to(tl.float32), 1)


@triton.jit
def _search(where_, rows, lo, hi, base, target, need, safe, MASS: tl.constexpr,
            FROM_BAND: tl.constexpr, BLK: tl.constexpr, NQ: tl.constexpr, MAX_STOP: tl.constexpr):
    """Largest key t in [lo, hi] where pred(t) holds, for a pred true at lo and monotone (rows
    where need; the others return hi): pred(t) = base + count(s >= unkey(t)) >= target (MASS
    False) or base + mass(s > unkey(t)) >= target (MASS True). NQ candidates per pass."""
    lo = tl.where(need, lo, hi)
    j = tl.arange(0, NQ).to(tl.int64)
    while tl.max(hi - lo, 0) > 0:
        width = (hi - lo)[:, None]
        q = lo[:, None] + (width * (j[None, :] + 1) + NQ) // (NQ + 1)  # in (lo, hi], increasing
        val = _scan(where_, rows, _unkey(q), safe, MASS, MASS, FROM_BAND, BLK, MAX_STOP)
        ok = base[:, None] + val >= target[:, None]
        go = hi > lo
        lo = tl.where(go, tl.maximum(lo, tl.max(tl.where(ok, q, lo[:, None]), 1)), lo)
        hi = tl.where(go, tl.minimum(hi, tl.min(tl.where(ok, hi[:, None], q - 1), 1)), hi)
    return lo


@triton.jit
def _scan1(where_, rows, t, safe, FROM_BAND: tl.constexpr, BLK: tl.constexpr, MAX_STOP: tl.constexpr):
    """Sum of exp(s - safe) of the scores >= t [BR]."""
    return tl.sum(_scan(where_, rows, t[:, None], safe, True, False, FROM_BAND, BLK, MAX_STOP), 1)


@triton.jit
def _kept_race(where_, rows, key, pos, t, safe, FROM_BAND: tl.constexpr, BLK: tl.constexpr,
               MAX_STOP: tl.constexpr):
    """Over the scores >= t: race winner (score, id), count, sum of exp, smallest score."""
    wv = tl.full(t.shape, NEG, tl.float32)
    wid = tl.zeros(t.shape, tl.int32)
    cnt = tl.zeros(t.shape, tl.int32)
    mass = tl.zeros(t.shape, tl.float32)
    smin = tl.full(t.shape, POS, tl.float32)
    if FROM_BAND:
        bufv, bufi, CAP, n, nmax = where_
        for b0 in range(0, nmax, BLK):
            j = b0 + tl.arange(0, BLK)
            msk = j[None, :] < n[:, None]
            at = rows.to(tl.int64)[:, None] * CAP + j[None, :]
            s = tl.load(bufv + at, mask=msk, other=NEG)
            ids = tl.load(bufi + at, mask=msk, other=0)
            kept = msk & (s >= t[:, None])
            cnt += tl.sum(kept.to(tl.int32), 1)
            mass += tl.sum(tl.where(kept, tl.exp(s - safe[:, None]), 0.0), 1)
            smin = tl.minimum(smin, tl.min(tl.where(kept, s, POS), 1))
            wv, wid = _race_update(wv, wid, tl.where(kept, s + _gumbel(key, pos, ids), NEG), ids)
    else:
        src, slot, pen, rmask = where_
        for start in range(0, src[4], BLK):
            cols = start + tl.arange(0, BLK)
            s = _scores(src, rows, cols, rmask, slot, pen, MAX_STOP)
            ids = tl.broadcast_to(cols[None, :], s.shape)
            kept = s >= t[:, None]
            cnt += tl.sum(kept.to(tl.int32), 1)
            mass += tl.sum(tl.where(kept, tl.exp(s - safe[:, None]), 0.0), 1)
            smin = tl.minimum(smin, tl.min(tl.where(kept, s, POS), 1))
            wv, wid = _race_update(wv, wid, tl.where(kept, s + _gumbel(key, pos, ids), NEG), ids)
    return wv, wid, cnt, mass, smin


@triton.jit
def _band_summary(bufv, rows, CAP, n, nmax, safe, BB: tl.constexpr):
    """Min, max and sum of exp(s - safe) of the band scores of rows [BR] (n of them each)."""
    lo = tl.full(n.shape, POS, tl.float32)
    hi = tl.full(n.shape, NEG, tl.float32)
    mass = tl.zeros(n.shape, tl.float32)
    for b0 in range(0, nmax, BB):
        j = b0 + tl.arange(0, BB)
        msk = j[None, :] < n[:, None]
        s = tl.load(bufv + rows.to(tl.int64)[:, None] * CAP + j[None, :], mask=msk, other=NEG)
        lo = tl.minimum(lo, tl.min(tl.where(msk, s, POS), 1))
        hi = tl.maximum(hi, tl.max(s, 1))
        mass += tl.sum(tl.where(msk, tl.exp(s - safe[:, None]), 0.0), 1)
    return lo, hi, mass


@triton.jit
def _band_threshold(band, rows, flags, filt, z, safe, t_m, n, c_hi, m_hi, bmin, bmax,
                    BB: tl.constexpr, NQ: tl.constexpr):
    """Threshold T of rows [BR] from the band (an NQ-way search over its scores).

    band = (bufv, CAP, n, nmax). Returns (T, top_p x mass of the top-k survivors, k - c_hi)."""
    top_k, top_p, _ = filt
    on_k = (flags & TOP_K) != 0
    on_p = (flags & TOP_P) != 0
    kk = top_k - c_hi  # rank of the k-th largest inside the band
    need_k = on_k & (kk >= 1) & (kk <= n)
    zero = tl.zeros(z.shape, tl.float32)
    tk = _unkey(_search(band, rows, _key(bmin), _key(bmax), zero, kk.to(tl.float32), need_k, safe,
                        False, True, BB, NQ, 1))
    t_k = tl.where(on_k, tl.where(kk <= 0, POS, tl.where(kk > n, NEG, tk)), NEG)
    pz = top_p * tl.where(on_k, m_hi + _scan1(band, rows, t_k, safe, True, BB, 1), z)
    top_kept = (m_hi < pz) & (n > 0)  # the band's best token survives top-p
    # the last key whose tokens above already reach pz, + 1: the smallest key top-p keeps
    tp = _unkey(_search(band, rows, _key(bmin) - 1, _key(bmax), m_hi, pz, on_p & top_kept, safe,
                        True, True, BB, NQ, 1) + 1)
    t_p = tl.where(on_p, tl.where(top_kept, tp, POS), NEG)
    return tl.maximum(tl.maximum(t_k, t_p), t_m), pz, kk


@triton.jit
def _band_exact(flags, filt, t_m, lo, hi, n, nfin, c_hi, m_hi, bmin, mb, t, pz, kk, n_kept):
    """True where the band provably held the threshold: every token >= hi is kept, every token
    below lo is dropped, and (top-k with top-p) the top-k survivors' mass was known exactly."""
    top_k = filt[0]
    on_k = (flags & TOP_K) != 0
    on_p = (flags & TOP_P) != 0
    on_m = (flags & MIN_P) != 0
    below = nfin - c_hi - n
    below_dropped = ((below == 0) | ((n > 0) & (bmin < t)) | (on_m & (lo <= t_m))
                     | (on_k & (c_hi + n >= top_k)) | (on_p & (m_hi + mb >= pz)))
    above_kept = (n_kept > 0) | (c_hi == 0) | (
        (~on_k | (c_hi <= top_k)) & (~on_p | (m_hi < pz)) & (~on_m | (hi >= t_m)))
    zk_known = ~(on_k & on_p) | ((kk >= 0) & (kk <= n)) | (below == 0)
    return below_dropped & above_kept & zk_known & (~on_k | (c_hi <= top_k))


@triton.jit
def _slow_threshold(row, rows, flags, filt, m, z, safe, smin, t_m, need, BC: tl.constexpr,
                    NQ: tl.constexpr, MAX_STOP: tl.constexpr):
    """The threshold by NQ-ary search over the whole row (rows where the band did not hold it)."""
    top_k, top_p, _ = filt
    on_k = (flags & TOP_K) != 0
    on_p = (flags & TOP_P) != 0
    lo = _key(smin)
    hi = _key(m)
    zero = tl.zeros(z.shape, tl.float32)
    t_k = tl.where(on_k, _unkey(_search(row, rows, lo, hi, zero, top_k.to(tl.float32), need & on_k,
                                        safe, False, False, BC, NQ, MAX_STOP)), NEG)
    pz = top_p * tl.where(on_k, _scan1(row, rows, t_k, safe, False, BC, MAX_STOP), z)
    tp = _search(row, rows, lo - 1, hi, zero, pz, need & on_p, safe, True, False, BC, NQ, MAX_STOP) + 1
    t_p = tl.where(on_p, _unkey(tp), NEG)
    return tl.maximum(tl.maximum(t_k, t_p), t_m)


@triton.jit
def _combine_gather(wgf, wgi, rows, rmask, NC, NCP: tl.constexpr):
    """Tokens >= hi over all chunks: count, mass, race winner; and whether any chunk's band
    writes disagreed with the pivot counts."""
    base, msk, c = _chunk_offsets(rows, rmask, NC, NCP)
    c_hi = tl.sum(tl.load(wgi + base * GI, mask=msk, other=0), 1)
    m_hi = tl.sum(tl.load(wgf + base * GF, mask=msk, other=0.0), 1)
    wv = tl.load(wgf + base * GF + 1, mask=msk, other=NEG)
    best = tl.max(wv, 1)
    first = tl.min(tl.where(wv == best[:, None], c[None, :], NCP), 1)
    wid = tl.sum(tl.where(c[None, :] == first[:, None], tl.load(wgi + base * GI + 1, mask=msk, other=0), 0), 1)
    bad = tl.max(tl.load(wgi + base * GI + 2, mask=msk, other=0), 1)
    return c_hi, m_hi, best, wid, bad


@triton.jit(**PER_STEP)
def finalize_kernel(src, slots_ptr, fp_ptr, ip_ptr, wsf, wsi, wgf, wgi, wrf, wri, bufv, bufi,
                    out_ptr, R, NC, CAP, RECORD: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                    BB: tl.constexpr, NCP: tl.constexpr, NQ: tl.constexpr, MAX_STOP: tl.constexpr):
    """Grid (cdiv(R, BR),): each row's token, threshold and kept mass; with RECORD, the slot's
    position advances and its penalty row counts the token."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    slot, temp, flags, pos, key, pen, filt = _row_ctx(slots_ptr, fp_ptr, ip_ptr, rows, rmask)
    m, z, smin, amax, nfin, _, race_id = _combine_stats(wsf, wsi, rows, rmask, NC, NCP)
    safe = tl.where(m == NEG, 0.0, m)
    greedy = temp <= 0
    filtered = rmask & ~greedy & ((flags & FILTERS) != 0)
    tok = tl.where(greedy, amax, race_id)
    thr = tl.where(greedy, m, NEG)
    zt = z
    path = tl.where(greedy, 0, 1)
    if tl.max(filtered.to(tl.int32), 0) > 0:
        t_m = _filter_ctx(flags, filt, m, z)[4]
        c_hi, m_hi, a_v, a_id, bad = _combine_gather(wgf, wgi, rows, rmask, NC, NCP)
        lo = tl.load(wrf + rows * RF, mask=filtered, other=0.0)
        hi = tl.load(wrf + rows * RF + 1, mask=filtered, other=0.0)
        n = tl.load(wri + rows * RI, mask=filtered, other=0)
        fits = filtered & (n <= CAP) & (bad == 0)
        n = tl.where(fits, n, 0)
        nmax = tl.max(n, 0)
        bmin, bmax, mb = _band_summary(bufv, rows, CAP, n, nmax, safe, BB)
        band = (bufv, CAP, n, nmax)
        t, pz, kk = _band_threshold(band, rows, flags, filt, z, safe, t_m, n, c_hi, m_hi, bmin, bmax,
                                    BB, NQ)
        b_v, b_id, n_kept, m_kept, kmin = _kept_race((bufv, bufi, CAP, n, nmax), rows, key, pos, t,
                                                     safe, True, BB, 1)
        exact = fits & _band_exact(flags, filt, t_m, lo, hi, n, nfin, c_hi, m_hi, bmin, mb, t, pz,
                                   kk, n_kept)
        band_wins = (b_v > a_v) | ((b_v == a_v) & (b_id < a_id))
        tok = tl.where(filtered, tl.where(band_wins, b_id, a_id), tok)
        thr = tl.where(filtered, tl.where(n_kept > 0, kmin, hi), thr)
        zt = tl.where(filtered, m_hi + m_kept, zt)
        path = tl.where(filtered, 2, path)
        slow = filtered & ~exact
        if tl.max(slow.to(tl.int32), 0) > 0:
            row = (src, slot, pen, rmask)
            ts = _slow_threshold(row, rows, flags, filt, m, z, safe, smin, t_m, slow, BC, NQ, MAX_STOP)
            s_v, s_id, _, s_mass, _ = _kept_race(row, rows, key, pos, ts, safe, False, BC, MAX_STOP)
            tok = tl.where(slow, s_id, tok)
            thr = tl.where(slow, ts, thr)
            zt = tl.where(slow, s_mass, zt)
            path = tl.where(slow, 3, path)
    tl.store(out_ptr + rows, tok.to(tl.int64), mask=rmask)
    tl.store(wrf + rows * RF + 2, thr, mask=rmask)
    tl.store(wrf + rows * RF + 3, zt, mask=rmask)
    tl.store(wri + rows * RI + 1, path, mask=rmask)
    if RECORD:
        tl.store(ip_ptr + slot * NUM_I + I_POS, pos + 1, mask=rmask)
        pen_row = pen[0]
        at = src[2] + pen_row * src[4] + tok
        has = rmask & (pen_row >= 0)
        tl.store(at, tl.load(at, mask=has, other=0) + 1, mask=has)


@triton.jit(**PER_STEP)
def probs_kernel(src, slots_ptr, fp_ptr, ip_ptr, wsf, wsi, wrf, out_ptr, s_o, R, NC,
                 CHUNK: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NCP: tl.constexpr,
                 MAX_STOP: tl.constexpr):
    """Grid (cdiv(R, BR), NC): out [R, V] = exp(s - m) / Z over s >= T (one-hot if greedy)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    chunk = tl.program_id(1)
    slot, temp, flags, pos, key, pen, filt = _row_ctx(slots_ptr, fp_ptr, ip_ptr, rows, rmask)
    m, _, _, amax, _, _, _ = _combine_stats(wsf, wsi, rows, rmask, NC, NCP)
    safe = tl.where(m == NEG, 0.0, m)
    thr = tl.load(wrf + rows * RF + 2, mask=rmask, other=0.0)
    zt = tl.load(wrf + rows * RF + 3, mask=rmask, other=1.0)
    greedy = temp <= 0
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BC):
        cols = start + tl.arange(0, BC)
        s = _scores(src, rows, cols, rmask, slot, pen, MAX_STOP)
        p = tl.where(s >= thr[:, None], tl.exp(s - safe[:, None]) / zt[:, None], 0.0)
        p = tl.where(greedy[:, None], (cols[None, :] == amax[:, None]).to(tl.float32), p)
        msk = rmask[:, None] & (cols < src[4])[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * s_o + cols[None, :], p, mask=msk)
