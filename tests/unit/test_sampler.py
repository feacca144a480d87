"""Sampler: filters never emit excluded tokens, penalties as specified, sampling matches softmax."""

import math

import pytest
import torch

from gpu_engine.sampler import Penalties, SamplingBatch, apply_penalties, row_key, sample, uniform_noise


def batch(rows, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, positions=None, **kw):
    positions = list(range(rows)) if positions is None else positions
    return SamplingBatch(
        temperature=torch.full((rows,), temperature),
        top_k=torch.full((rows,), top_k, dtype=torch.int64),
        top_p=torch.full((rows,), top_p),
        min_p=torch.full((rows,), min_p),
        keys=torch.tensor([row_key(seed, 0)] * rows, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        all_greedy=temperature == 0,
        any_top_k=top_k > 0,
        any_top_p=top_p < 1.0,
        any_min_p=min_p > 0,
        **kw,
    )


def test_noise_is_a_pure_function_of_key_position_and_token():
    keys = torch.tensor([row_key(7, 0), row_key(7, 1), row_key(8, 0)], dtype=torch.int64)
    pos = torch.tensor([3, 3, 3])
    a = uniform_noise(keys, pos, 1000)
    b = uniform_noise(keys.flip(0), pos, 1000).flip(0)  # other rows around it change nothing
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert not torch.equal(a, uniform_noise(keys, pos + 1, 1000))
    assert float(a.min()) > 0.0 and float(a.max()) < 1.0
    assert abs(float(a.mean()) - 0.5) < 0.02


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, batch(5, temperature=0.0)), logits.argmax(-1))


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_top_k_never_emits_tokens_outside_the_k_largest(top_k):
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1)).repeat(400, 1)
    allowed = set(logits[0].topk(top_k).indices.tolist())
    drawn = sample(logits, batch(400, temperature=1.5, top_k=top_k)).tolist()
    assert set(drawn) <= allowed
    assert len(set(drawn)) == len(allowed)  # every allowed token shows up in 400 draws


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(2)).repeat(500, 1)
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True).tolist()
    allowed, mass = set(), 0.0
    for t in order:
        allowed.add(t)
        mass += float(probs[t])
        if mass >= top_p:
            break
    drawn = set(sample(logits, batch(500, top_p=top_p)).tolist())
    assert drawn <= allowed
    assert len(drawn) >= 1


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_drops_tokens_below_min_p_times_the_top(min_p):
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(3)).repeat(500, 1)
    probs = logits[0].softmax(-1)
    allowed = {t for t in range(40) if probs[t] >= min_p * probs.max()}
    assert set(sample(logits, batch(500, min_p=min_p)).tolist()) <= allowed


def test_filters_compose_top_k_then_top_p_then_min_p():
    logits = torch.tensor([[4.0, 3.5, 3.0, 1.0, 0.5, 0.0]]).repeat(300, 1)
    drawn = set(sample(logits, batch(300, top_k=4, top_p=0.8, min_p=0.0)).tolist())
    probs4 = logits[0, :4].softmax(-1)  # top-p works on the top-k survivors, renormalised
    assert float(probs4[:2].sum()) < 0.8 <= float(probs4[:3].sum())
    assert drawn == {0, 1, 2}


def test_penalties_change_logits_as_specified():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    pen = Penalties(
        rows=torch.tensor([0]),
        prompt_mask=torch.tensor([[True, False, False, False, True]]),
        output_counts=torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0]]),
        repetition=torch.tensor([2.0]),
        presence=torch.tensor([0.5]),
        frequency=torch.tensor([0.25]),
    )
    got = apply_penalties(logits, pen)
    # token 0: seen in prompt, positive -> /2; token 1: output x2, negative -> *2, -0.5, -0.25*2
    # token 3: output x1, positive -> /2, -0.5 - 0.25; token 4: prompt, negative -> *2; token 2 untouched
    want = torch.tensor([[1.0, -2.0 - 0.5 - 0.5, 0.5, 1.5 - 0.5 - 0.25, -4.0]])
    assert torch.allclose(got, want)
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]]))  # input untouched


def test_banned_tokens_are_never_drawn_even_greedy():
    logits = torch.tensor([[5.0, 1.0, 0.0]]).repeat(2, 1)
    b = batch(2, temperature=0.0, banned=[(0, [0]), (1, [0, 1])])
    assert sample(logits, b).tolist() == [1, 2]


def test_temperature_sampling_matches_the_softmax_distribution():
    """Chi-square goodness of fit over 20k draws (7 degrees of freedom; 0.1% critical value 24.3)."""
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 0.7, 1.3])
    temperature, draws = 0.8, 20_000
    rows = logits.repeat(draws, 1)
    tokens = sample(rows, batch(draws, temperature=temperature, seed=11))
    observed = torch.bincount(tokens, minlength=8).double()
    expected = (logits / temperature).softmax(-1).double() * draws
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, f"chi2={chi2}, observed={observed.tolist()}, expected={expected.tolist()}"
    assert math.isclose(float(observed.sum()), draws)
