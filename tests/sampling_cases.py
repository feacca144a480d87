"""Shared by the sampler tests: a mix of sampling parameters, reference race scores, comparisons."""

from __future__ import annotations

import torch

from gpu_engine.sampler import Sampler, row_key
from gpu_engine.sampling_params import SamplingParams as SP
from taxiway_kernels import reference_sampling as L

EOS = 0
# Every feature alone and together; ban ids 7 and 9 (plus EOS) before min_tokens.
PARAM_MIX = [
    SP(temperature=0.0),
    SP(temperature=1.0),
    SP(temperature=0.7, top_k=5),
    SP(temperature=1.3, top_p=0.8),
    SP(temperature=0.9, top_k=40, top_p=0.9),
    SP(temperature=1.0, min_p=0.1),
    SP(temperature=0.8, top_k=50, top_p=0.95, min_p=0.02),
    SP(temperature=0.8, top_p=0.95, repetition_penalty=1.3, frequency_penalty=0.5),
    SP(temperature=0.0, presence_penalty=1.0, min_tokens=3, stop_token_ids=(7, 9)),
    SP(temperature=1.0, top_k=200),
    SP(temperature=1.0, top_p=0.999),
    SP(temperature=0.6, top_p=0.3, presence_penalty=-0.5, min_tokens=2),
    SP(temperature=1.1, top_k=1),
    SP(temperature=2.0, top_k=3, top_p=0.5, repetition_penalty=0.8),
    SP(temperature=0.5, min_p=0.5, frequency_penalty=-0.3, min_tokens=4, stop_token_ids=tuple(range(20, 40))),
    SP(temperature=1.0, top_k=1000, top_p=0.99),
]


def fill(sampler: Sampler, params: list[SP], slots: list[int], seed: int = 5, prompt=(1, 2, 3, 7, 11),
         output=(5, 5, 12)) -> None:
    """Load params[i] into slots[i], keyed by (seed, i)."""
    for i, (p, slot) in enumerate(zip(params, slots)):
        sampler.set_slot(slot, p, row_key(seed, i), prompt_token_ids=prompt, output_token_ids=output,
                         eos_token_ids=[EOS])


def race_scores(sampler: Sampler, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[R, V] the reference's race scores at the slots' current state (-inf outside the kept set;
    the processed logits for greedy rows): the token drawn is each row's argmax."""
    sampler._flush()
    t = sampler.tables
    slots = slots.long()
    x = L.process_slots(logits, slots, t)
    f, i = t.fparams[slots], t.iparams[slots]
    temp = f[:, L.F_TEMP]
    s = L.scores(x, temp)
    keep = L.keep_mask(s, i[:, L.I_TOP_K].long(), f[:, L.F_TOP_P], f[:, L.F_LOG_MIN_P])
    g = L.gumbel_noise(i[:, L.I_KEY].long() & 0xFFFFFFFF, i[:, L.I_POS].long(), x.shape[1])
    race = torch.where(keep, s + g, float("-inf"))
    return torch.where((temp > 0)[:, None], race, x)


def assert_tokens_match(got: torch.Tensor, race: torch.Tensor, max_share: float = 0.01) -> None:
    """got [R] equals argmax(race) except on near ties (scores within float error of the winner),
    and never a token the reference excludes."""
    want = race.argmax(dim=-1)
    got = got.to(want.device)
    picked = race.gather(1, got[:, None]).squeeze(1)
    best = race.max(dim=-1).values
    assert bool(torch.isfinite(picked).all()), f"excluded tokens drawn: rows {(~torch.isfinite(picked)).nonzero().tolist()}"
    off = (got != want).nonzero().squeeze(1)
    tol = 1e-4 * best.abs().clamp(min=1.0)
    far = off[(best[off] - picked[off]) > tol[off]]
    assert far.numel() == 0, f"rows {far.tolist()}: got {got[far].tolist()}, want {want[far].tolist()}"
    assert off.numel() <= max(1, int(max_share * got.numel())), f"{off.numel()} near-tie mismatches"
