"""Verifying drafted tokens so that the output keeps the target model's distribution exactly.

For each speculating sequence the target scored k + 1 positions: the k drafted tokens' positions,
then the bonus position after the last draft. Draft j is accepted with probability
min(1, p_j(d_j) / q_j(d_j)); at the first rejection a token is drawn from the normalized residual
max(0, p_j - q_j) and the rest are dropped; when all k are accepted the bonus token is drawn from
p_k. Greedy requests accept while the draft equals the target's argmax (the same rule with a
one-hot p).

A draft with no distribution (n-gram lookups, greedy drafters) is a point mass: q_j(d_j) = 1.
Then the rule is run as "draw t_j from p_j with the sampler's own noise for that output position,
accept iff t_j == d_j, else emit t_j": the acceptance probability is p_j(d_j) and a rejected t_j is
distributed as the residual, so this *is* the min(1, p/q) rule, and a seeded request emits exactly
the tokens it would emit without speculation.

Randomness is counter-based, keyed by (request key, output position) like gpu_engine/sampler.py,
so seeded requests are reproducible whatever else is batched. Pure torch, any device, no host sync.
"""

from __future__ import annotations

from collections.abc import Callable

from dataclasses import dataclass

import numpy as np
import torch

from gpu_engine.sampler import uniform_noise

# Distinct streams for the acceptance draws and the residual draws (the bonus and point-mass
# draws use the sampler's own stream, keyed by the plain request key).
SALT_ACCEPT = 0x3C6EF372
SALT_RESIDUAL = 0x1B873593


@dataclass(frozen=True)
class VerifyLayout:
    """Where each sequence's rows are. Sequence i owns target rows row_start[i] .. row_start[i] +
    num_drafts[i] (its drafts' positions, then the bonus position) and draft entries
    draft_start[i] .. draft_start[i] + num_drafts[i] - 1. Built on the host once per step and
    uploaded in one copy."""

    num_drafts: tuple[int, ...]
    row_seq: torch.Tensor  # [N] int64: owning sequence of each target row (N = sum(k_i + 1))
    row_offset: torch.Tensor  # [N] int64: j, the row's index within its sequence
    draft_row: torch.Tensor  # [D] int64: target row scoring each draft (D = sum(k_i))
    seq_draft: torch.Tensor  # [S, K] int64: draft entry of (i, j), clamped into range where j >= k_i
    seq_valid: torch.Tensor  # [S, K] bool: j < k_i
    seq_row: torch.Tensor  # [S, K + 1] int64: target row of (i, j); the bonus row where j > k_i
    columns: torch.Tensor  # [K + 1] int64: 0 .. K
    bonus_row: torch.Tensor  # [S] int64
    num_drafts_t: torch.Tensor  # [S] int64

    @classmethod
    def build(cls, num_drafts: list[int] | tuple[int, ...], device: torch.device,
              upload: Callable[[np.ndarray], torch.Tensor] | None = None) -> "VerifyLayout":
        """upload: how a host array reaches the device (the runner's pinned, non-blocking copies;
        default a plain copy, which on a GPU waits for the stream)."""
        return cls.build_with(num_drafts, device, upload)[0]

    @classmethod
    def build_with(cls, num_drafts: list[int] | tuple[int, ...], device: torch.device,
                   upload: Callable[[np.ndarray], torch.Tensor] | None = None,
                   extra: tuple[np.ndarray, ...] = ()) -> tuple["VerifyLayout", list[torch.Tensor]]:
        """The layout, and the int64 host arrays `extra` on the device, all in one upload (a verify
        step's few small arrays cost one copy, not one each)."""
        k = np.asarray(num_drafts, dtype=np.int64)
        if k.ndim != 1 or (k < 0).any():
            raise ValueError(f"num_drafts must be a list of non-negative ints, got {list(num_drafts)}")
        s, kmax = len(k), int(k.max()) if len(k) else 0
        rows = k + 1
        row_start = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
        draft_start = np.concatenate([[0], np.cumsum(k)[:-1]]).astype(np.int64)
        row_seq = np.repeat(np.arange(s, dtype=np.int64), rows)
        row_offset = np.arange(rows.sum(), dtype=np.int64) - np.repeat(row_start, rows)
        draft_seq = np.repeat(np.arange(s, dtype=np.int64), k)
        draft_row = row_start[draft_seq] + (np.arange(k.sum(), dtype=np.int64) - draft_start[draft_seq])
        j = np.arange(kmax + 1, dtype=np.int64)[None, :]
        valid = j[:, :kmax] < k[:, None]
        seq_draft = np.minimum(draft_start[:, None] + j[:, :kmax], max(int(k.sum()) - 1, 0))
        seq_row = row_start[:, None] + np.minimum(j, k[:, None])
        parts = [row_seq, row_offset, draft_row, seq_draft, valid.astype(np.int64), seq_row, j[0], row_start + k,
                 k, *(np.asarray(a, dtype=np.int64) for a in extra)]
        packed = np.concatenate([a.reshape(-1) for a in parts])
        up = upload or (lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device))  # noqa: E731
        flat = up(packed).split([a.size for a in parts])
        t = [x.view(a.shape) for x, a in zip(flat, parts)]
        layout = cls(num_drafts=tuple(int(x) for x in k), row_seq=t[0], row_offset=t[1], draft_row=t[2],
                     seq_draft=t[3], seq_valid=t[4] != 0, seq_row=t[5], columns=t[6], bonus_row=t[7],
                     num_drafts_t=t[8])
        return layout, t[9:]

    @property
    def max_drafts(self) -> int:
        return max(self.num_drafts, default=0)


@dataclass
class VerifyResult:
    token_ids: torch.Tensor  # [S, K + 1] int64: accepted drafts, then one drawn token; -1 after
    num_emitted: torch.Tensor  # [S] int64: accepted drafts + 1

    @property
    def num_accepted(self) -> torch.Tensor:  # [S] int64
        return self.num_emitted - 1


def exponential_race(probs: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One draw per row of probs [R, V] (rows need not be normalized) with the counter-based noise
    of (keys [R], positions [R]): argmax(log p + g), g = -log(-log u), picks i with probability
    p_i / sum(p); the sampler's race in Gumbel form, so the same (key, position) draws its token."""
    u = uniform_noise(keys, positions, probs.shape[-1])
    return (probs.log() - (-u.log()).log()).argmax(dim=-1)


def rejection_sample(
    target_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    layout: VerifyLayout,
    greedy: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    all_greedy: bool = False,
) -> VerifyResult:
    """Accept or reject every sequence's drafts in one pass.

    target_probs [N, V] f32: the target's processed distribution (penalties, temperature, top-k/p,
      min-p applied) at each target row of `layout` (greedy rows: only their argmax is used).
    draft_token_ids [D] int64: the drafts, sequence after sequence.
    greedy [S] bool; keys [S] int64 (row_key of seed and sample index); positions [S] int64: output
      index of each sequence's first verified token (its bonus token sits at positions + k_i).
      With all_greedy they are not read and may be None.
    draft_probs [D, V] f32 or None: the distribution each draft was drawn from (None: point masses).
    all_greedy: every sequence is greedy (the host knows it): only the argmax of each row of
      target_probs is used, so any scores with the target's argmax do (the logits, when no
      penalty or ban applies), and no noise is drawn.
    """
    n, vocab = target_probs.shape
    num_seqs = len(layout.num_drafts)
    _check(target_probs, draft_token_ids, layout, greedy, keys, positions, draft_probs, n, vocab, num_seqs,
           all_greedy)
    if all_greedy:  # accept while each draft is the target's argmax; then the argmax
        return _assemble_point_mass(layout, draft_token_ids, target_probs.argmax(dim=-1))
    row_keys = keys[layout.row_seq]
    row_pos = positions[layout.row_seq] + layout.row_offset
    drawn = exponential_race(target_probs, row_keys, row_pos)  # [N]: a plain draw at every row
    drawn = torch.where(greedy[layout.row_seq], target_probs.argmax(dim=-1), drawn)
    if draft_probs is None:  # a rejected point-mass draw is already a residual draw
        return _assemble_point_mass(layout, draft_token_ids, drawn)
    drafted_at = drawn[layout.draft_row]  # [D]
    accept, correction = _accept_with_q(target_probs, draft_token_ids, draft_probs, layout, keys,
                                        positions, greedy, drafted_at)
    return _assemble(layout, draft_token_ids, accept, correction, drawn[layout.bonus_row])


def _assemble_point_mass(layout: VerifyLayout, drafts: torch.Tensor, drawn: torch.Tensor) -> VerifyResult:
    """Point-mass drafts: draft j is accepted iff the token drawn at its row is the draft, and the
    token emitted at the first mismatch (or the bonus, after k accepted) is the one drawn there.
    So a sequence emits its drawn tokens up to and including the first mismatch: few kernels."""
    num_seqs, kmax = len(layout.num_drafts), layout.max_drafts
    per_seq = drawn[layout.seq_row]  # [S, K + 1]
    if kmax == 0:
        return VerifyResult(per_seq, torch.ones(num_seqs, dtype=torch.int64, device=drawn.device))
    match = (per_seq[:, :kmax] == drafts[layout.seq_draft]) & layout.seq_valid  # [S, K]
    num_acc = match.long().cumprod(dim=1).sum(dim=1)  # [S]: leading accepted drafts
    out = torch.where(layout.columns[None, :] <= num_acc[:, None], per_seq, -1)
    return VerifyResult(out, num_acc + 1)


def _accept_with_q(p, drafts, q, layout, keys, positions, greedy, drafted_at):
    """Acceptance and residual draws for drafts drawn from distributions q ([D, V])."""
    rows = layout.draft_row
    d_seq = layout.row_seq[rows]
    d_pos = positions[d_seq] + layout.row_offset[rows]
    p_rows = p[rows]  # [D, V]
    p_d = p_rows.gather(1, drafts[:, None]).squeeze(1)
    q_d = q.gather(1, drafts[:, None]).squeeze(1)
    u = uniform_noise(keys[d_seq] ^ SALT_ACCEPT, d_pos, 1).squeeze(1)  # [D] in (0, 1)
    accept = u * q_d < p_d  # u < p/q without dividing by a zero q
    residual = (p_rows - q).clamp_min(0.0)
    resampled = exponential_race(residual, keys[d_seq] ^ SALT_RESIDUAL, d_pos)
    # p == q leaves no residual, but then every draft is accepted (u * q < p): the draw is unused.
    greedy_d = greedy[d_seq]
    accept = torch.where(greedy_d, drafted_at == drafts, accept)
    correction = torch.where(greedy_d, drafted_at, resampled)
    return accept, correction


def _assemble(layout: VerifyLayout, drafts, accept, correction, bonus) -> VerifyResult:
    num_seqs, kmax = len(layout.num_drafts), layout.max_drafts
    dev = bonus.device
    if kmax == 0:
        return VerifyResult(bonus[:, None].clone(), torch.ones(num_seqs, dtype=torch.int64, device=dev))
    ok = accept[layout.seq_draft] & layout.seq_valid  # [S, K]
    num_acc = ok.long().cumprod(dim=1).sum(dim=1)  # [S]: leading accepted drafts
    seq_drafts = torch.where(layout.seq_valid, drafts[layout.seq_draft], -1)
    seq_corr = correction[layout.seq_draft]
    at = num_acc.clamp(max=kmax - 1)[:, None]
    last = torch.where(num_acc < layout.num_drafts_t, seq_corr.gather(1, at).squeeze(1), bonus)
    j = layout.columns[None, :]
    out = torch.cat([seq_drafts, torch.full((num_seqs, 1), -1, dtype=torch.int64, device=dev)], dim=1)
    out = torch.where(j < num_acc[:, None], out, -1)
    out = torch.where(j == num_acc[:, None], last[:, None], out)
    return VerifyResult(out, num_acc + 1)


def _check(p, drafts, layout, greedy, keys, positions, q, n, vocab, num_seqs, all_greedy) -> None:
    want_rows = sum(layout.num_drafts) + num_seqs
    if p.dim() != 2 or n != want_rows:
        raise ValueError(f"target_probs must be [{want_rows}, vocab] (k_i + 1 rows per sequence for "
                         f"num_drafts {list(layout.num_drafts)}), got {tuple(p.shape)}")
    if p.dtype != torch.float32:
        raise ValueError(f"target_probs must be float32, got {p.dtype}")
    if tuple(drafts.shape) != (sum(layout.num_drafts),) or drafts.dtype != torch.int64:
        raise ValueError(f"draft_token_ids must be int64 [{sum(layout.num_drafts)}], got "
                         f"{drafts.dtype} {tuple(drafts.shape)}")
    for name, t, dtype in (("greedy", greedy, torch.bool), ("keys", keys, torch.int64),
                           ("positions", positions, torch.int64)):
        if t is None and all_greedy:
            continue
        if t is None or tuple(t.shape) != (num_seqs,) or t.dtype != dtype:
            got = "None" if t is None else f"{t.dtype} {tuple(t.shape)}"
            raise ValueError(f"{name} must be {dtype} [{num_seqs}], got {got}")
    if q is not None and (tuple(q.shape) != (drafts.shape[0], vocab) or q.dtype != torch.float32):
        raise ValueError(f"draft_probs must be float32 [{drafts.shape[0]}, {vocab}], got "
                         f"{q.dtype} {tuple(q.shape)}")
