"""The verify half of a speculative step, runner side: the target's logits at every verify
entry's 1 + k rows, the slot sampler's distributions there (each row as the slot's draw that many
tokens further on, earlier drafts counted for penalties), the rejection sampler, and the slots'
sampling state advanced by the tokens each entry emits. Launched with the step, collected with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from gpu_engine.input_batch import ranges
from gpu_engine.outputs import Logprobs
from gpu_engine.sampler import Sampler, gather_logprobs
from gpu_engine.spec.rejection import VerifyLayout, rejection_sample
from gpu_engine.step_plan import SampledToken, ScheduledSeq


@dataclass
class VerifyFlight:
    """A launched verify: what collect needs (host tensors valid once the step's event fired)."""

    entries: list[int]  # index into plan.entries of each verify entry
    tokens: torch.Tensor  # [S, K + 1] int64: emitted tokens, -1 after
    counts: torch.Tensor  # [S] int64: tokens each entry emits
    lp_rows: list[tuple[int, int]] = field(default_factory=list)  # (entry s, j) of rows with logprobs
    lp_wants: list[int] = field(default_factory=list)  # their top-N
    chosen: torch.Tensor | None = None  # [L] f32
    top_v: torch.Tensor | None = None  # [L, N] f32
    top_i: torch.Tensor | None = None  # [L, N] int64


def launch_verify(
    entries: list[tuple[int, ScheduledSeq, int]],  # (index into plan.entries, entry, its first token row)
    hidden: torch.Tensor,  # [T, hidden]: the step's final hidden states
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    sampler: Sampler,
    want_logprobs: np.ndarray,  # [slots] int64: top-N asked for per slot, -1 none
    upload: Callable,
    download: Callable,
) -> VerifyFlight:
    dev = hidden.device
    ks = np.array([len(e.draft_token_ids) for _, e, _ in entries], dtype=np.int64)
    slots = np.array([e.seq.slot for _, e, _ in entries], dtype=np.int64)
    first = np.array([r for _, _, r in entries], dtype=np.int64)
    offsets = ranges(ks + 1)  # [N]: j of each row within its entry
    rows = np.repeat(first, ks + 1) + offsets
    row_slots = np.repeat(slots, ks + 1)
    draft_ids = np.array([t for _, e, _ in entries for t in e.draft_token_ids], dtype=np.int64)
    layout, (rows_t, drafts, slots_t) = VerifyLayout.build_with(ks.tolist(), dev, upload, (rows, draft_ids, slots))
    logits = compute_logits(hidden[rows_t])  # [N, V] f32
    if sampler.plain_greedy():  # the logits' argmax is every row's token: no distributions needed
        result = rejection_sample(logits, drafts, layout, None, None, None, all_greedy=True)
    else:
        greedy, keys, positions = sampler.verify_params(slots)
        probs = sampler.verify_probs(logits, row_slots, offsets, _prior_drafts(entries, ks))
        result = rejection_sample(probs, drafts, layout, greedy, keys, positions,
                                  _draft_probs(entries, drafts, logits.shape[1]))
    sampler.advance(slots, result.token_ids, result.num_emitted, slots_t)
    flight = VerifyFlight([i for i, _, _ in entries], download(result.token_ids), download(result.num_emitted))
    want = want_logprobs[row_slots]
    lp = np.flatnonzero(want >= 0)
    if len(lp):
        idx = upload(lp)
        emitted = result.token_ids[layout.row_seq, layout.row_offset].clamp(min=0)  # [N]
        chosen, top_v, top_i = gather_logprobs(torch.log_softmax(logits[idx], dim=-1), emitted[idx],
                                               int(want[lp].max()))
        seq_of_row = np.repeat(np.arange(len(ks)), ks + 1)
        flight.lp_rows = list(zip(seq_of_row[lp].tolist(), offsets[lp].tolist()))
        flight.lp_wants = want[lp].tolist()
        flight.chosen = download(chosen)
        flight.top_v = None if top_v is None else download(top_v)
        flight.top_i = None if top_i is None else download(top_i)
    return flight


def warm_up_verify(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden_size: int, k: int,
                   device: torch.device, dtype: torch.dtype) -> None:
    """Run the verify path's kernels once (greedy, point-mass and drafted-distribution rejection
    sampling on k + 1 rows), so that a GPU loads them at start: loaded on first use instead, they
    cost the first verify step tens of milliseconds (45 ms measured on an H200: call L4)."""
    with torch.inference_mode():
        layout = VerifyLayout.build([k], device)
        logits = compute_logits(torch.zeros(k + 1, hidden_size, device=device, dtype=dtype))
        drafts = torch.zeros(k, dtype=torch.int64, device=device)
        flags = torch.zeros(1, dtype=torch.bool, device=device)
        keys = positions = torch.zeros(1, dtype=torch.int64, device=device)
        rejection_sample(logits, drafts, layout, None, None, None, all_greedy=True)
        probs = torch.softmax(logits, dim=-1)
        rejection_sample(probs, drafts, layout, flags, keys, positions)
        rejection_sample(probs, drafts, layout, flags, keys, positions, probs[:k].contiguous())
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def collect_verify(flight: VerifyFlight, logprob_dicts) -> dict[int, list[SampledToken]]:
    """Index into plan.entries -> the entry's emitted tokens with their logprobs (where asked)."""
    tokens, counts = flight.tokens.tolist(), flight.counts.tolist()
    lps: dict[tuple[int, int], Logprobs] = {}
    if flight.lp_rows:
        chosen_ids = [tokens[s][j] for s, j in flight.lp_rows]
        dicts = logprob_dicts(chosen_ids, flight.chosen.tolist(),
                              None if flight.top_v is None else flight.top_v.tolist(),
                              None if flight.top_i is None else flight.top_i.tolist(), flight.lp_wants)
        lps = dict(zip(flight.lp_rows, dicts))
    return {e: [SampledToken(tokens[s][j], lps.get((s, j))) for j in range(counts[s])]
            for s, e in enumerate(flight.entries)}


def _prior_drafts(entries, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, token) pairs: row j of an entry follows its drafts 0 .. j - 1 (counted as output)."""
    rows, ids, base = [], [], 0
    for (_, e, _), k in zip(entries, ks.tolist()):
        for j in range(1, k + 1):
            rows.extend([base + j] * j)
            ids.extend(e.draft_token_ids[:j])
        base += k + 1
    return np.array(rows, dtype=np.int64), np.array(ids, dtype=np.int64)


def _draft_probs(entries, drafts: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """[D, V] f32: each draft's distribution (a one-hot for point masses); None if all are."""
    if all(e.draft_probs is None for _, e, _ in entries):
        return None
    parts, d = [], 0
    for _, e, _ in entries:
        k = len(e.draft_token_ids)
        q = e.draft_probs
        if q is None:
            q = torch.nn.functional.one_hot(drafts[d : d + k], vocab).float()
        parts.append(q.to(device=drafts.device, dtype=torch.float32))
        d += k
    return torch.cat(parts)

