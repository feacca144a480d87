"""Plain-torch reference of token sampling, and the slot-table layout the sampling kernels read.

What the CPU engine runs, and what kernel tests compare the Triton kernels to (taxiway_kernels/sampling.py).

Semantics, per row (one sample drawn), in this order:
  1. penalties (slots with them): repetition (HF: divide positive, multiply negative logits of every
     token seen in the prompt or the output), then frequency (minus f per output occurrence), then
     presence (minus p once per token in the output); then bans: stop/EOS ids are -inf while fewer
     than min_tokens tokens were generated.
  2. temperature 0: greedy, the argmax (first index on ties). Otherwise s = logits / temperature and
  3. the kept set, always {s >= T} for one threshold T per row, and always holding the top token:
     top-k   keeps every token whose score is >= the k-th largest (ties with it kept);
     top-p   on the top-k survivors: keeps token u when the mass of the survivors scoring strictly
             above u is < top_p x their total mass (the smallest set reaching top_p, ties with its
             last token kept);
     min-p   keeps s >= max + log(min_p) (probability >= min_p x the top token's).
  4. the exponential race in Gumbel form: argmax over the kept set of s + g, g = -log(-log(u)),
     u a counter-based hash of (row key, output position, token id): this draws token i with
     probability softmax(s)_i over the kept set, and the same inputs always draw the same token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Slot tables: one row per slot. Floats [S, NUM_F] float32:
F_TEMP, F_TOP_P, F_LOG_MIN_P, F_REP, F_PRES, F_FREQ = range(6)
NUM_F = 8
# Ints [S, NUM_I] int32 (the key is a uint32 stored in its int32 bit pattern):
I_FLAGS, I_TOP_K, I_KEY, I_POS, I_PEN_ROW, I_MIN_TOKENS = range(6)
NUM_I = 8
# I_FLAGS bits.
TOP_K, TOP_P, MIN_P, PENALTY, BANS = 1, 2, 4, 8, 16
FILTERS = TOP_K | TOP_P | MIN_P
# Penalty-pool rows [P, V] int32: output count in the low bits, two flags above.
PROMPT_BIT = 1 << 30
BAN_BIT = 1 << 29
COUNT_MASK = BAN_BIT - 1

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SlotTables:
    """The per-slot sampling state, on one device (see gpu_engine.sampler.Sampler)."""

    fparams: torch.Tensor  # [S, NUM_F] float32
    iparams: torch.Tensor  # [S, NUM_I] int32; I_POS advances as tokens are drawn
    stop_ids: torch.Tensor  # [S, MAX_STOP] int32, -1 padded: banned while pos < min_tokens
    occ: torch.Tensor  # [P, V] int32 penalty rows (P may be 0)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix on int64 tensors holding values in [0, 2^32) (no overflow)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & _M32
    return x ^ (x >> 16)


def uniform_noise(keys: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] float32 in (0, 1): keys [R] int64 in [0, 2^32), positions [R] int64 (output index)."""
    a = mix32(keys ^ mix32(positions & _M32))
    cols = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    h = mix32((a[:, None] + cols[None, :] * 0x2545F491) & _M32)
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(keys: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] float32: -log(-log(u)) of uniform_noise."""
    return uniform_noise(keys, positions, vocab_size).log().neg().log().neg()


def penalize(
    x: torch.Tensor,  # [P, V] float32 logits of the penalised rows
    prompt: torch.Tensor,  # [P, V] bool: token occurs in the prompt
    counts: torch.Tensor,  # [P, V] int32 or float: occurrences in the output
    rep: torch.Tensor,  # [P] float32
    pres: torch.Tensor,  # [P] float32
    freq: torch.Tensor,  # [P] float32
) -> torch.Tensor:
    """Repetition (seen in prompt or output), then frequency, then presence. Returns new logits."""
    c = counts.float()
    seen = prompt | (c > 0)
    r = rep[:, None]
    x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    x = x - freq[:, None] * c
    return x - pres[:, None] * (c > 0).float()


def _mass_greater(s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """[R, V]: for each token, the sum of e over the tokens of its row scoring strictly higher."""
    sv, order = s.sort(dim=-1, descending=True)
    ev = e.gather(1, order)
    before = torch.cat([torch.zeros_like(ev[:, :1]), ev.cumsum(-1)[:, :-1]], dim=1)
    start = torch.ones_like(sv, dtype=torch.bool)
    start[:, 1:] = sv[:, 1:] != sv[:, :-1]  # first of each group of equal scores
    gt = torch.where(start, before, torch.full_like(before, float("-inf"))).cummax(-1).values
    return torch.empty_like(gt).scatter_(1, order, gt)


def keep_mask(
    s: torch.Tensor,  # [R, V] float32 scores (logits / temperature)
    top_k: torch.Tensor,  # [R] int, 0 = off
    top_p: torch.Tensor,  # [R] float32, 1 = off
    log_min_p: torch.Tensor,  # [R] float32, -inf = off
) -> torch.Tensor:
    """[R, V] bool: the tokens each row may draw (see the module docstring)."""
    v = s.shape[-1]
    m = s.max(dim=-1, keepdim=True).values
    keep = torch.ones_like(s, dtype=torch.bool)
    on_k = (top_k > 0) & (top_k < v)
    if bool(on_k.any()):
        k = torch.where(on_k, top_k, 1).to(torch.int64)
        kth = s.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        keep &= ~on_k[:, None] | (s >= kth)
    on_p = top_p < 1.0
    if bool(on_p.any()):
        e = torch.where(keep, (s - m).exp(), torch.zeros_like(s))
        z = e.sum(dim=-1, keepdim=True)
        keep &= ~on_p[:, None] | (_mass_greater(s, e) < top_p[:, None] * z)
    return keep & (s >= m + log_min_p[:, None])


def scores(x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """[R, V] float32: x / temperature (1 for greedy rows)."""
    div = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return x / div[:, None]


def sample_processed(
    x: torch.Tensor,  # [R, V] float32, after penalties and bans
    temperature: torch.Tensor,  # [R] float32, 0 = greedy
    top_k: torch.Tensor,  # [R] int
    top_p: torch.Tensor,  # [R] float32
    log_min_p: torch.Tensor,  # [R] float32
    keys: torch.Tensor,  # [R] int64 in [0, 2^32)
    positions: torch.Tensor,  # [R] int64
) -> torch.Tensor:
    """Token ids [R] int64: greedy rows the argmax, the others drawn from their kept set."""
    greedy = x.argmax(dim=-1)
    sampling = temperature > 0
    if not bool(sampling.any()):
        return greedy
    s = scores(x, temperature)
    keep = keep_mask(s, top_k, top_p, log_min_p)
    race = torch.where(keep, s + gumbel_noise(keys, positions, x.shape[-1]), float("-inf"))
    return torch.where(sampling, race.argmax(dim=-1), greedy)


def probs_processed(
    x: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    log_min_p: torch.Tensor,
) -> torch.Tensor:
    """[R, V] float32: the distribution each row draws from (one-hot at the argmax if greedy)."""
    s = scores(x, temperature)
    keep = keep_mask(s, top_k, top_p, log_min_p)
    p = torch.where(keep, s, float("-inf")).softmax(dim=-1)
    one_hot = torch.zeros_like(p).scatter_(1, x.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where((temperature > 0)[:, None], p, one_hot)


# -- the slot tables --------------------------------------------------------------------------------
def _slot_rows(t: SlotTables, slots: torch.Tensor):
    f, i = t.fparams[slots], t.iparams[slots]
    return f, i, i[:, I_FLAGS]


def process_slots(logits: torch.Tensor, slots: torch.Tensor, t: SlotTables) -> torch.Tensor:
    """[R, V] float32 logits after each slot's penalties and bans. slots: [R] int64."""
    x = logits.float().clone()
    f, i, flags = _slot_rows(t, slots)
    pen = (flags & PENALTY) != 0
    if bool(pen.any()):
        rows = pen.nonzero().squeeze(1)
        occ = t.occ[i[rows, I_PEN_ROW].long()]
        x[rows] = penalize(x[rows], (occ & PROMPT_BIT) != 0, occ & COUNT_MASK, f[rows, F_REP],
                           f[rows, F_PRES], f[rows, F_FREQ])
    ban_on = ((flags & BANS) != 0) & (i[:, I_POS] < i[:, I_MIN_TOKENS])
    if bool(ban_on.any()):
        v = x.shape[1]
        ids = t.stop_ids[slots].long()
        banned = torch.zeros(x.shape[0], v + 1, dtype=torch.bool, device=x.device)
        banned.scatter_(1, torch.where(ids >= 0, ids, v), True)
        banned = banned[:, :v]
        rows = (ban_on & (i[:, I_PEN_ROW] >= 0)).nonzero().squeeze(1)
        if rows.numel():
            banned[rows] |= (t.occ[i[rows, I_PEN_ROW].long()] & BAN_BIT) != 0
        x = torch.where(ban_on[:, None] & banned, float("-inf"), x)
    return x


def _filters(f: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (f[:, F_TEMP], i[:, I_TOP_K].long(), f[:, F_TOP_P], f[:, F_LOG_MIN_P])


def sample_slots(logits: torch.Tensor, slots: torch.Tensor, t: SlotTables, *, record: bool = True) -> torch.Tensor:
    """Token ids [R] int64 drawn for each row's slot; with record, each slot's position advances
    and its penalty row counts the token (what the Triton path does on the device)."""
    x = process_slots(logits, slots, t)
    f, i, _ = _slot_rows(t, slots)
    keys = i[:, I_KEY].long() & _M32
    tokens = sample_processed(x, *_filters(f, i), keys, i[:, I_POS].long())
    if record:
        record_tokens(t, slots, tokens)
    return tokens


def record_tokens(t: SlotTables, slots: torch.Tensor, tokens: torch.Tensor) -> None:
    """Advance the slots' positions and count the tokens in their penalty rows."""
    t.iparams[slots, I_POS] += 1
    pen_rows = t.iparams[slots, I_PEN_ROW].long()
    has = pen_rows >= 0
    if bool(has.any()):
        ones = torch.ones(int(has.sum()), dtype=t.occ.dtype, device=t.occ.device)
        t.occ.index_put_((pen_rows[has], tokens[has]), ones, accumulate=True)


def probs_slots(logits: torch.Tensor, slots: torch.Tensor, t: SlotTables) -> torch.Tensor:
    """[R, V] float32: the distribution sample_slots draws each row from (nothing recorded)."""
    f, i, _ = _slot_rows(t, slots)
    return probs_processed(process_slots(logits, slots, t), *_filters(f, i))
