"""Triton kernels of token sampling; kernels/sampling.py launches them, kernels/reference_sampling.py
states the semantics they implement.

Every kernel works on BR rows of the batch at once (1 on a GPU, more in the CPU interpreter); the
stats, pivot and gather kernels also split each row's vocabulary into fixed CHUNKs (grid axis 1),
so a row's arithmetic never depends on the batch around it. Scores are recomputed in each pass from
the logits and the slot's penalty row (`_scores`), never written back.

  stats     per chunk: max, first argmax, sum of exp, smallest finite score, finite count, and for
            rows without filters the winner of the Gumbel race (their token).
  pivots    (rows with top-k/top-p) counts and masses at PP pivots between two bounds; round r
            refines the interval round r-1 picked, so after ROUNDS rounds the band [lo, hi) that
            holds the threshold is narrow.
  gather    per chunk: count, mass and race winner of the tokens >= hi (kept for sure), and the
            band's tokens written to a per-row buffer of CAP (score, id) pairs.
  finalize  per row: the exact threshold inside the band by bisection (the `_band_*` helpers), the
            checks that the band really held it, else the slow path (bisection over the whole
            row), the token, and the slot's position and output count advanced on the device.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels import reference_sampling as L

NUM_F = tl.constexpr(L.NUM_F)
NUM_I = tl.constexpr(L.NUM_I)
F_TEMP = tl.constexpr(L.F_TEMP)
F_TOP_P = tl.constexpr(L.F_TOP_P)
F_LOG_MIN_P = tl.constexpr(L.F_LOG_MIN_P)
F_REP = tl.constexpr(L.F_REP)
F_PRES = tl.constexpr(L.F_PRES)
F_FREQ = tl.constexpr(L.F_FREQ)
I_FLAGS = tl.constexpr(L.I_FLAGS)
I_TOP_K = tl.constexpr(L.I_TOP_K)
I_KEY = tl.constexpr(L.I_KEY)
I_POS = tl.constexpr(L.I_POS)
I_PEN_ROW = tl.constexpr(L.I_PEN_ROW)
I_MIN_TOKENS = tl.constexpr(L.I_MIN_TOKENS)
TOP_K = tl.constexpr(L.TOP_K)
TOP_P = tl.constexpr(L.TOP_P)
MIN_P = tl.constexpr(L.MIN_P)
PENALTY = tl.constexpr(L.PENALTY)
BANS = tl.constexpr(L.BANS)
FILTERS = tl.constexpr(L.FILTERS)
PROMPT_BIT = tl.constexpr(L.PROMPT_BIT)
BAN_BIT = tl.constexpr(L.BAN_BIT)
COUNT_MASK = tl.constexpr(L.COUNT_MASK)
# Workspace records (see kernels/sampling.py): floats / ints per (row, chunk).
SF = tl.constexpr(4)  # stats: max, sum exp, min finite, race winner score
SI = tl.constexpr(3)  # stats: argmax, finite count, race winner id
GF = tl.constexpr(2)  # gather: mass >= hi, winner score
GI = tl.constexpr(3)  # gather: count >= hi, winner id, band tokens written != expected
RF = tl.constexpr(4)  # per row: lo, hi, then (finalize) threshold, sum exp over the kept set
RI = tl.constexpr(2)  # per row: band size, path (0 greedy, 1 race, 2 band, 3 slow)
NEG = tl.constexpr(float("-inf"))
POS = tl.constexpr(float("inf"))


# -- per-row state ----------------------------------------------------------------------------------
@triton.jit
def _row_ctx(slots_ptr, fp_ptr, ip_ptr, rows, rmask):
    """The slot parameters of rows [BR] (each a [BR] vector); see reference_sampling's layout."""
    slot = tl.load(slots_ptr + rows, mask=rmask, other=0).to(tl.int64)
    fb = fp_ptr + slot * NUM_F
    ib = ip_ptr + slot * NUM_I
    temp = tl.load(fb + F_TEMP, mask=rmask, other=0.0)
    flags = tl.load(ib + I_FLAGS, mask=rmask, other=0)
    pos = tl.load(ib + I_POS, mask=rmask, other=0)
    pen_row = tl.load(ib + I_PEN_ROW, mask=rmask, other=-1)
    ban_on = ((flags & BANS) != 0) & (pos < tl.load(ib + I_MIN_TOKENS, mask=rmask, other=0))
    pen_on = (flags & PENALTY) != 0
    use_occ = (pen_row >= 0) & (pen_on | ban_on)
    div = tl.where(temp > 0, temp, 1.0)
    pen = (pen_row.to(tl.int64), use_occ, pen_on, ban_on,
           tl.load(fb + F_REP, mask=rmask, other=1.0), tl.load(fb + F_PRES, mask=rmask, other=0.0),
           tl.load(fb + F_FREQ, mask=rmask, other=0.0), div)
    key = tl.load(ib + I_KEY, mask=rmask, other=0).to(tl.uint32, bitcast=True)
    filt = (tl.load(ib + I_TOP_K, mask=rmask, other=0), tl.load(fb + F_TOP_P, mask=rmask, other=1.0),
            tl.load(fb + F_LOG_MIN_P, mask=rmask, other=NEG))
    return slot, temp, flags, pos, key, pen, filt


@triton.jit
def _scores(src, rows, cols, rmask, slot, pen, MAX_STOP: tl.constexpr):
    """[BR, BC] float32 scores of columns cols [BC]: logits, penalties, bans, / temperature.

    src = (logits_ptr, logits row stride, occ_ptr, stop_ids_ptr, V); -inf beyond V."""
    logits_ptr, s_l, occ_ptr, stop_ptr, V = src
    pen_row, use_occ, pen_on, ban_on, rep, pres, freq, div = pen
    m2 = rmask[:, None] & (cols < V)[None, :]
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * s_l + cols[None, :], mask=m2, other=NEG)
    x = x.to(tl.float32)
    occ = tl.load(occ_ptr + pen_row[:, None] * V + cols[None, :], mask=m2 & use_occ[:, None], other=0)
    cnt = occ & COUNT_MASK
    seen = ((occ & PROMPT_BIT) != 0) | (cnt > 0)
    r = rep[:, None]
    y = tl.where(seen, tl.where(x > 0, tl.div_rn(x, r), x * r), x)
    y = y - freq[:, None] * cnt.to(tl.float32)
    y = y - pres[:, None] * (cnt > 0).to(tl.float32)
    x = tl.where(pen_on[:, None], y, x)
    banned = (occ & BAN_BIT) != 0
    if tl.max(ban_on.to(tl.int32), 0) > 0:
        for j in tl.static_range(MAX_STOP):
            sid = tl.load(stop_ptr + slot * MAX_STOP + j, mask=rmask & ban_on, other=-1)
            banned = banned | (cols[None, :] == sid[:, None])
    x = tl.where(ban_on[:, None] & banned, NEG, x)
    return tl.div_rn(x, div[:, None])


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x1B873593
    return x ^ (x >> 16)


@triton.jit
def _gumbel(key, pos, ids):
    """key, pos [BR] (uint32, int32), ids [BR, BC] int32 -> [BR, BC] float32 -log(-log(u))."""
    base = _mix32(key ^ _mix32(pos.to(tl.uint32, bitcast=True)))
    h = _mix32(base[:, None] + ids.to(tl.uint32, bitcast=True) * 0x2545F491)
    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(u))


@triton.jit
def _race_update(best, best_id, sc, ids):
    """Keep the higher of (best, best_id) [BR] and the tile's max of sc [BR, BC] (lowest id on ties)."""
    tv = tl.max(sc, 1)
    tid = tl.min(tl.where(sc == tv[:, None], ids, 2147483647), 1)
    better = (tv > best) | ((tv == best) & (tid < best_id))
    return tl.where(better, tv, best), tl.where(better, tid, best_id)


@triton.jit
def _key(x):
    """float32 -> int64 whose order is the floats' order."""
    b = x.to(tl.int32, bitcast=True)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _unkey(k):
    b = k.to(tl.int32)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


# -- combining per-chunk records ----------------------------------------------------------------
@triton.jit
def _chunk_offsets(rows, rmask, NC, NCP: tl.constexpr):
    c = tl.arange(0, NCP)
    return rows.to(tl.int64)[:, None] * NC + c[None, :], rmask[:, None] & (c < NC)[None, :], c


@triton.jit
def _combine_stats(wsf, wsi, rows, rmask, NC, NCP: tl.constexpr):
    """Row max m, sum of exp(s - m), min finite score, first argmax, finite count, race winner."""
    base, msk, c = _chunk_offsets(rows, rmask, NC, NCP)
    mc = tl.load(wsf + base * SF, mask=msk, other=NEG)
    m = tl.max(mc, 1)
    safe = tl.where(m == NEG, 0.0, m)
    z = tl.sum(tl.load(wsf + base * SF + 1, mask=msk, other=0.0) * tl.exp(mc - safe[:, None]), 1)
    smin = tl.min(tl.load(wsf + base * SF + 2, mask=msk, other=POS), 1)
    first = tl.min(tl.where(mc == m[:, None], c[None, :], NCP), 1)
    amax = tl.sum(tl.where(c[None, :] == first[:, None], tl.load(wsi + base * SI, mask=msk, other=0), 0), 1)
    nfin = tl.sum(tl.load(wsi + base * SI + 1, mask=msk, other=0), 1)
    wv = tl.load(wsf + base * SF + 3, mask=msk, other=NEG)
    wbest = tl.max(wv, 1)
    wfirst = tl.min(tl.where(wv == wbest[:, None], c[None, :], NCP), 1)
    wid = tl.sum(tl.where(c[None, :] == wfirst[:, None], tl.load(wsi + base * SI + 2, mask=msk, other=0), 0), 1)
    return m, z, smin, amax, nfin, wbest, wid


@triton.jit
def _pivots(a, b, PP: tl.constexpr):
    """[BR, PP] float32 pivots from a to b (both included), non-decreasing."""
    j = tl.arange(0, PP)
    t = j.to(tl.float32) / (PP - 1)
    real = (a > NEG) & (b < POS) & (b > a)  # rows without a real interval get width 0
    width = tl.where(real, b, 0.0) - tl.where(real, a, 0.0)
    v = tl.minimum(a[:, None] + width[:, None] * t[None, :], b[:, None])
    return tl.where((j == PP - 1)[None, :], b[:, None], v)


@triton.jit
def _pick(x, idx, PP: tl.constexpr):
    """x [BR, PP] at column idx [BR]."""
    j = tl.arange(0, PP)
    return tl.sum(tl.where(j[None, :] == idx[:, None], x, 0), 1)


@triton.jit
def _round_totals(wsc, wsm, rd, rows, rmask, R, NC, NCP: tl.constexpr, PP: tl.constexpr):
    """[BR, NCP, PP] per-chunk counts of round rd and their [BR, PP] totals (counts, masses)."""
    base, msk, _ = _chunk_offsets(rows, rmask, NC, NCP)
    j = tl.arange(0, PP)
    off = ((rd * R * NC + base) * PP)[:, :, None] + j[None, None, :]
    cc = tl.load(wsc + off, mask=msk[:, :, None], other=0)
    mm = tl.load(wsm + off, mask=msk[:, :, None], other=0.0)
    return cc, tl.sum(cc, 1), tl.sum(mm, 1)


@triton.jit
def _chain(ws, rows, rmask, R, NC, a, b, k, pz, on_k, UPTO: tl.constexpr, NCP: tl.constexpr,
           PP: tl.constexpr):
    """Replay the decisions of rounds 0..UPTO-1 from their records: the interval [a, b] that round
    UPTO splits, the last pivot index picked and that round's per-chunk counts [BR, NCP, PP]."""
    wsc, wsm = ws
    idx = tl.zeros_like(k)
    cc = tl.zeros([a.shape[0], NCP, PP], tl.int32)
    for rd in tl.static_range(UPTO):
        cc, C, M = _round_totals(wsc, wsm, rd, rows, rmask, R, NC, NCP, PP)
        jk = tl.sum((C >= k[:, None]).to(tl.int32), 1) - 1
        jp = tl.sum((M >= pz[:, None]).to(tl.int32), 1) - 1
        idx = tl.maximum(tl.where(on_k, jk, jp), 0)
        v = _pivots(a, b, PP)
        na = _pick(v, idx, PP)
        b = tl.where(idx == PP - 1, b, _pick(v, idx + 1, PP))
        a = na
    return a, b, idx, cc


@triton.jit
def _search_floor(flags, smin, t_m):
    """Where the pivot rounds start: the min-p threshold, except under top-k with top-p, whose
    band must reach the k-th token (top-p divides by the mass of all top-k survivors)."""
    both = ((flags & TOP_K) != 0) & ((flags & TOP_P) != 0)
    return tl.where(both, smin, tl.maximum(smin, t_m))


@triton.jit
def _filter_ctx(flags, filt, m, z):
    """(k, top_p x Z, top-k on, top-p on, min-p threshold or -inf) of rows [BR]."""
    top_k, top_p, lmp = filt
    on_k = (flags & TOP_K) != 0
    on_p = (flags & TOP_P) != 0
    t_m = tl.where((flags & MIN_P) != 0, m + lmp, NEG)
    return top_k, top_p * z, on_k, on_p, t_m


# -- kernels ------------------------------------------------------------------------------------
@triton.jit
def stats_kernel(src, slots_ptr, fp_ptr, ip_ptr, wsf, wsi, R, NC, CHUNK: tl.constexpr,
                 BR: tl.constexpr, BC: tl.constexpr, MAX_STOP: tl.constexpr):
    """Grid (cdiv(R, BR), NC)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    chunk = tl.program_id(1)
    slot, temp, flags, pos, key, pen, filt = _row_ctx(slots_ptr, fp_ptr, ip_ptr, rows, rmask)
    race = rmask & (temp > 0) & ((flags & FILTERS) == 0)
    any_race = tl.max(race.to(tl.int32), 0) > 0
    m = tl.full([BR], NEG, tl.float32)
    z = tl.zeros([BR], tl.float32)
    smin = tl.full([BR], POS, tl.float32)
    amax = tl.zeros([BR], tl.int32)
    nfin = tl.zeros([BR], tl.int32)
    wv = tl.full([BR], NEG, tl.float32)
    wid = tl.zeros([BR], tl.int32)
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BC):
        cols = start + tl.arange(0, BC)
        s = _scores(src, rows, cols, rmask, slot, pen, MAX_STOP)
        tm = tl.max(s, 1)
        amax = tl.where(tm > m, start + tl.argmax(s, 1).to(tl.int32), amax)
        m_new = tl.maximum(m, tm)
        safe = tl.where(m_new == NEG, 0.0, m_new)
        z = z * tl.exp(m - safe) + tl.sum(tl.exp(s - safe[:, None]), 1)
        m = m_new
        finite = s > NEG
        smin = tl.minimum(smin, tl.min(tl.where(finite, s, POS), 1))
        nfin += tl.sum(finite.to(tl.int32), 1)
        if any_race:
            ids = tl.broadcast_to(cols[None, :], (BR, BC))
            sc = tl.where(race[:, None], s + _gumbel(key, pos, ids), NEG)
            wv, wid = _race_update(wv, wid, sc, ids)
    off = rows.to(tl.int64) * NC + chunk
    tl.store(wsf + off * SF, m, mask=rmask)
    tl.store(wsf + off * SF + 1, z, mask=rmask)
    tl.store(wsf + off * SF + 2, smin, mask=rmask)
    tl.store(wsf + off * SF + 3, wv, mask=rmask)
    tl.store(wsi + off * SI, amax, mask=rmask)
    tl.store(wsi + off * SI + 1, nfin, mask=rmask)
    tl.store(wsi + off * SI + 2, wid, mask=rmask)


@triton.jit
def pivot_kernel(src, slots_ptr, fp_ptr, ip_ptr, wsf, wsi, wsc, wsm, R, NC, ROUND: tl.constexpr,
                 CHUNK: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NCP: tl.constexpr,
                 PP: tl.constexpr, MAX_STOP: tl.constexpr):
    """Grid (cdiv(R, BR), NC): counts and masses of scores >= each pivot of round ROUND."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    chunk = tl.program_id(1)
    slot, temp, flags, pos, key, pen, filt = _row_ctx(slots_ptr, fp_ptr, ip_ptr, rows, rmask)
    act = rmask & (temp > 0) & ((flags & (TOP_K | TOP_P)) != 0)
    if tl.max(act.to(tl.int32), 0) > 0:
        m, z, smin, _, _, _, _ = _combine_stats(wsf, wsi, rows, rmask, NC, NCP)
        k, pz, on_k, on_p, t_m = _filter_ctx(flags, filt, m, z)
        a, b, _, _ = _chain((wsc, wsm), rows, rmask, R, NC, _search_floor(flags, smin, t_m), m, k,
                            pz, on_k, ROUND, NCP, PP)
        v = _pivots(a, b, PP)
        safe = tl.where(m == NEG, 0.0, m)
        cnt = tl.zeros([BR, PP], tl.int32)
        mass = tl.zeros([BR, PP], tl.float32)
        for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BC):
            cols = start + tl.arange(0, BC)
            s = _scores(src, rows, cols, rmask, slot, pen, MAX_STOP)
            e = tl.exp(s - safe[:, None])
            ge = s[:, :, None] >= v[:, None, :]
            cnt += tl.sum(ge.to(tl.int32), 1)
            mass += tl.sum(tl.where(ge, e[:, :, None], 0.0), 1)
        j = tl.arange(0, PP)
        off = (((ROUND * R + rows.to(tl.int64)) * NC + chunk) * PP)[:, None] + j[None, :]
        tl.store(wsc + off, cnt, mask=act[:, None])
        tl.store(wsm + off, mass, mask=act[:, None])


@triton.jit
def _band_bounds(ws, rows, rmask, R, NC, flags, filt, m, z, smin, ROUNDS: tl.constexpr,
                 NCP: tl.constexpr, PP: tl.constexpr):
    """The band [lo, hi) of rows [BR] and its per-chunk token counts [BR, NCP]."""
    k, pz, on_k, on_p, t_m = _filter_ctx(flags, filt, m, z)
    rounds_on = on_k | on_p
    a, b, idx, cc = _chain(ws, rows, rmask, R, NC, _search_floor(flags, smin, t_m), m, k, pz, on_k,
                           ROUNDS, NCP, PP)
    hi_inf = (idx == PP - 1) | (on_k & on_p)
    lo = tl.where(rounds_on, a, t_m)
    hi = tl.where(rounds_on, tl.where(hi_inf, POS, b), t_m)
    j = tl.arange(0, PP)
    at_lo = tl.sum(tl.where(j[None, None, :] == idx[:, None, None], cc, 0), 2)
    at_hi = tl.sum(tl.where(j[None, None, :] == idx[:, None, None] + 1, cc, 0), 2)
    band_c = tl.where(rounds_on[:, None], at_lo - tl.where(hi_inf[:, None], 0, at_hi), 0)
    return lo, hi, band_c


@triton.jit
def gather_kernel(src, slots_ptr, fp_ptr, ip_ptr, wsf, wsi, wsc, wsm, wgf, wgi, wrf, wri, bufv, bufi,
                  R, NC, CAP, ROUNDS: tl.constexpr, CHUNK: tl.constexpr, BR: tl.constexpr,
                  BC: tl.constexpr, NCP: tl.constexpr, PP: tl.constexpr, MAX_STOP: tl.constexpr):
    """Grid (cdiv(R, BR), NC): for rows with filters, the tokens >= hi (count, mass, race winner)
    and the band's tokens, written to bufv/bufi [R, CAP] in chunk order."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    chunk = tl.program_id(1)
    slot, temp, flags, pos, key, pen, filt = _row_ctx(slots_ptr, fp_ptr, ip_ptr, rows, rmask)
    act = rmask & (temp > 0) & ((flags & FILTERS) != 0)
    if tl.max(act.to(tl.int32), 0) > 0:
        m, z, smin, _, _, _, _ = _combine_stats(wsf, wsi, rows, rmask, NC, NCP)
        lo, hi, band_c = _band_bounds((wsc, wsm), rows, rmask, R, NC, flags, filt, m, z, smin,
                                      ROUNDS, NCP, PP)
        c = tl.arange(0, NCP)
        n = tl.sum(band_c, 1)
        start_at = tl.sum(tl.where(c[None, :] < chunk, band_c, 0), 1)
        mine = tl.sum(tl.where(c[None, :] == chunk, band_c, 0), 1)
        do_band = act & (n <= CAP)
        safe = tl.where(m == NEG, 0.0, m)
        ca = tl.zeros([BR], tl.int32)
        ma = tl.zeros([BR], tl.float32)
        wv = tl.full([BR], NEG, tl.float32)
        wid = tl.zeros([BR], tl.int32)
        written = tl.zeros([BR], tl.int32)
        rbase = rows.to(tl.int64)[:, None] * CAP
        for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BC):
            cols = start + tl.arange(0, BC)
            s = _scores(src, rows, cols, rmask, slot, pen, MAX_STOP)
            above = act[:, None] & (s >= hi[:, None])
            ca += tl.sum(above.to(tl.int32), 1)
            ma += tl.sum(tl.where(above, tl.exp(s - safe[:, None]), 0.0), 1)
            ids = tl.broadcast_to(cols[None, :], (BR, BC))
            if tl.sum(above.to(tl.int32)) > 0:
                sc = tl.where(above, s + _gumbel(key, pos, ids), NEG)
                wv, wid = _race_update(wv, wid, sc, ids)
            band = do_band[:, None] & (s >= lo[:, None]) & (s < hi[:, None])
            if tl.sum(band.to(tl.int32)) > 0:
                at = (start_at + written)[:, None] + tl.cumsum(band.to(tl.int32), 1) - 1
                ok = band & (at < (start_at + mine)[:, None])
                tl.store(bufv + rbase + at, s, mask=ok)
                tl.store(bufi + rbase + at, ids, mask=ok)
                written += tl.sum(band.to(tl.int32), 1)
        off = rows.to(tl.int64) * NC + chunk
        tl.store(wgf + off * GF, ma, mask=act)
        tl.store(wgf + off * GF + 1, wv, mask=act)
        tl.store(wgi + off * GI, ca, mask=act)
        tl.store(wgi + off * GI + 1, wid, mask=act)
        tl.store(wgi + off * GI + 2, (do_band & (written != mine)).to(tl.int32), mask=act)
        first = act & (chunk == 0)
        tl.store(wrf + rows * RF, lo, mask=first)
        tl.store(wrf + rows * RF + 1, hi, mask=first)
        tl.store(wri + rows * RI, n, mask=first)


# -- finalize: the exact threshold ------------------------------------------------------------------
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
    """Threshold T of rows [BR] from the band (bisection over its scores) and the mass above it.

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
        (~on_k | (c_hi <= top_k)) & (~on_p | (m_hi <= pz)) & (~on_m | (hi >= t_m)))
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


@triton.jit
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


@triton.jit
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
