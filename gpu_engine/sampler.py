"""Token sampling on the logits' device: penalties, temperature, top-k, top-p, min-p, seeded noise.

Randomness is a counter-based hash of (request seed, sample index, output position, token id), so a
seeded request draws the same numbers whatever else is in the batch, after preemption, or when it
resumes elsewhere, with no per-request generator and no host round trip. Sampling uses the
exponential race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix on int64 tensors holding values in [0, 2^32) (no overflow)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & _M32
    return x ^ (x >> 16)


def row_key(seed: int, sample_index: int) -> int:
    """A 32-bit key for one sample's stream, from a 64-bit seed (pure Python, exact)."""
    x = (seed ^ (sample_index * 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & _M32


def uniform_noise(keys: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] float32 in (0, 1): keys [R] int64 (row_key), positions [R] int64 (output index)."""
    a = _mix32(keys ^ _mix32(positions & _M32))
    cols = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    h = _mix32((a[:, None] + cols[None, :] * 0x2545F491) & _M32)
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


@dataclass
class SamplingBatch:
    """Per-row sampling parameters, as tensors on the logits' device. One row per sample drawn."""

    temperature: torch.Tensor  # [R] float32, 0 = greedy
    top_k: torch.Tensor  # [R] int64, 0 = off
    top_p: torch.Tensor  # [R] float32, 1 = off
    min_p: torch.Tensor  # [R] float32, 0 = off
    keys: torch.Tensor  # [R] int64, row_key(seed, sample index)
    positions: torch.Tensor  # [R] int64, output index of the token being drawn
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    penalties: "Penalties | None" = None
    banned: list[tuple[int, list[int]]] | None = None
    """(row, token ids) the row must not emit now (stop tokens before min_tokens)."""


@dataclass
class Penalties:
    rows: torch.Tensor  # [P] int64: which rows
    prompt_mask: torch.Tensor  # [P, V] bool: token occurs in the prompt
    output_counts: torch.Tensor  # [P, V] float32: occurrences in the output
    repetition: torch.Tensor  # [P] float32
    presence: torch.Tensor  # [P] float32
    frequency: torch.Tensor  # [P] float32


def apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    """Repetition (HF: divide positive, multiply negative logits of seen tokens), then presence and
    frequency (subtract per output occurrence), on the rows p.rows. Returns new logits."""
    rows = logits[p.rows]
    seen = p.prompt_mask | (p.output_counts > 0)
    rep = p.repetition[:, None]
    rows = torch.where(seen, torch.where(rows > 0, rows / rep, rows * rep), rows)
    rows = rows - p.frequency[:, None] * p.output_counts
    rows = rows - p.presence[:, None] * (p.output_counts > 0).float()
    out = logits.clone()
    out[p.rows] = rows
    return out


def _mask_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    k = top_k.clamp(min=1, max=logits.shape[-1])
    kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
    drop = (logits < kth) & (top_k > 0)[:, None]
    return logits.masked_fill(drop, float("-inf"))


def _mask_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = (before >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _mask_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    drop = probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Penalties and bans: what both greedy and random sampling pick from."""
    if batch.penalties is not None:
        logits = apply_penalties(logits, batch.penalties)
    if batch.banned:
        logits = logits.clone()
        for row, ids in batch.banned:
            logits[row, ids] = float("-inf")
    return logits


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [R, V] float32 -> token ids [R] int64."""
    logits = process_logits(logits, batch)
    greedy = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy
    temp = torch.where(batch.temperature > 0, batch.temperature, torch.ones_like(batch.temperature))
    scaled = logits / temp[:, None]
    if batch.any_top_k:
        scaled = _mask_top_k(scaled, batch.top_k)
    if batch.any_top_p:
        scaled = _mask_top_p(scaled, batch.top_p)
    if batch.any_min_p:
        scaled = _mask_min_p(scaled, batch.min_p)
    probs = scaled.softmax(dim=-1)
    exp_noise = -torch.log(uniform_noise(batch.keys, batch.positions, logits.shape[-1]))
    drawn = (probs / exp_noise).argmax(dim=-1)
    return torch.where(batch.temperature > 0, drawn, greedy)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """For rows [R, V] of log-probabilities: the given tokens' values [R], and the top-N values and
    ids [R, N] (None when num_top is 0)."""
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    if num_top <= 0:
        return chosen, None, None
    top = logprobs.topk(num_top, dim=-1)
    return chosen, top.values, top.indices
