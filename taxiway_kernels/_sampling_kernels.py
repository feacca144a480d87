"""Triton kernels of token sampling; taxiway_kernels/sampling.py launches them, taxiway_kernels/reference_sampling.py
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
  finalize  (taxiway_kernels/_sampling_finalize.py) per row: the exact threshold inside the band by a
            16-way search, the checks that the band really held it, else the slow path (the same
            search over the whole row), the token, and the slot's position and output count
            advanced on the device.
"""

from __future__ import annotations

import triton
import triton.language as tl

from taxiway_kernels import reference_sampling as L

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
# Workspace records (see taxiway_kernels/sampling.py): floats / ints per (row, chunk).
SF = tl.constexpr(4)  # stats: max, sum exp, min finite, race winner score
SI = tl.constexpr(3)  # stats: argmax, finite count, race winner id
GF = tl.constexpr(2)  # gather: mass >= hi, winner score
GI = tl.constexpr(3)  # gather: count >= hi, winner id, band tokens written != expected
RF = tl.constexpr(4)  # per row: lo, hi, then (finalize) threshold, sum exp over the kept set
RI = tl.constexpr(2)  # per row: band size, path (0 greedy, 1 race, 2 band, 3 slow)
# The kernels' row count changes every step and slots may be a view at any offset: neither is
# specialised (one compile per configuration, which the sampler's start-up warm-up makes).
PER_STEP = {"do_not_specialize": ["R"], "do_not_specialize_on_alignment": ["slots_ptr"]}
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
@triton.jit(**PER_STEP)
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


@triton.jit(**PER_STEP)
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


@triton.jit(**PER_STEP)
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
