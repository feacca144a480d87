"""Sampling on the CPU: filters never emit excluded tokens, penalties as specified, sampling matches
the softmax; the reference's tie and order semantics; the slot Sampler's lifecycle."""

import math
from collections import Counter

import pytest
import torch

from gpu_engine.sampler import Penalties, Sampler, SamplingBatch, apply_penalties, row_key, sample, uniform_noise
from gpu_engine.sampling_params import SamplingParams as SP
from taxiway_kernels import reference_sampling as L
from tests.sampling_cases import EOS, PARAM_MIX, fill


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


# -- the reference's semantics ------------------------------------------------------------------------
def _kept(logits, top_k=0, top_p=1.0, min_p=0.0, temperature=1.0):
    s = L.scores(torch.tensor([logits]), torch.tensor([temperature]))
    lmp = torch.tensor([math.log(min_p) if min_p > 0 else -math.inf])
    return set(L.keep_mask(s, torch.tensor([top_k]), torch.tensor([top_p]), lmp)[0].nonzero().squeeze(1).tolist())


def test_top_k_keeps_every_token_tied_with_the_kth():
    assert _kept([3.0, 2.0, 2.0, 2.0, 1.0], top_k=2) == {0, 1, 2, 3}
    assert _kept([3.0, 2.0, 2.0, 2.0, 1.0], top_k=5) == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_smallest_prefix_and_its_ties():
    # probabilities 0.4, 0.2, 0.2, 0.2 (as logits): 0.5 needs the top token and one 0.2, so all
    # three tied 0.2 tokens stay; 0.3 needs only a second token too.
    logits = [math.log(0.4), math.log(0.2), math.log(0.2), math.log(0.2)]
    assert _kept(logits, top_p=0.5) == {0, 1, 2, 3}
    assert _kept(logits, top_p=0.4) == {0}  # the top token alone reaches 0.4
    assert _kept([5.0, 0.0, 0.0], top_p=0.01) == {0}  # the first token is always kept


def test_temperature_applies_before_top_p_and_min_p():
    logits = [2.0, 1.0, 0.0, -1.0]
    assert _kept(logits, top_p=0.8, temperature=1.0) == {0, 1}
    assert _kept(logits, top_p=0.8, temperature=3.0) == {0, 1, 2}
    assert _kept(logits, min_p=0.3, temperature=1.0) == {0, 1}  # e^-1 = 0.37 >= 0.3 > e^-2
    assert _kept(logits, min_p=0.3, temperature=4.0) == {0, 1, 2, 3}


def test_reference_chi_square_against_the_top_k_top_p_distribution():
    """20k draws; top-k 6 then top-p 0.9 over 10 tokens; 0.1% critical value for 5 dof: 20.5
    (at most 5 dof: fewer tokens survive)."""
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 0.7, 1.3, -2.0, 0.4])
    draws = 20_000
    s = logits / 0.7
    keep = L.keep_mask(s[None], torch.tensor([6]), torch.tensor([0.9]), torch.tensor([-math.inf]))[0]
    top6 = s.argsort(descending=True)[:6]
    by_hand, mass = set(), 0.0
    for t, q in zip(top6.tolist(), s[top6].softmax(-1).tolist()):
        if mass >= 0.9:
            break
        by_hand.add(t)
        mass += q
    assert set(keep.nonzero().squeeze(1).tolist()) == by_hand and 1 < len(by_hand) < 6
    tokens = L.sample_processed(logits.repeat(draws, 1), torch.full((draws,), 0.7), torch.full((draws,), 6),
                                torch.full((draws,), 0.9), torch.full((draws,), -math.inf),
                                torch.full((draws,), row_key(4, 0)), torch.arange(draws))
    observed = torch.bincount(tokens, minlength=10).double()
    assert float(observed[~keep].sum()) == 0
    expected = torch.where(keep, s, -math.inf).softmax(-1).double() * draws
    chi2 = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 20.5, (chi2, observed.tolist())


def test_legacy_batch_and_slot_sampler_draw_the_same_tokens():
    """The per-step interface the engine uses today and the Sampler agree token for token."""
    vocab, rows = 80, len(PARAM_MIX)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(6)) * 2
    sampler = Sampler(rows, vocab, "cpu")
    fill(sampler, PARAM_MIX, list(range(rows)), prompt=(1, 2), output=(5, 5, 12))
    got = sampler.sample(logits, torch.arange(rows))
    keys = torch.tensor([row_key(5, i) for i in range(rows)])
    counts = torch.zeros(rows, vocab)
    counts[:, 5], counts[:, 12] = 2.0, 1.0
    prompt = torch.zeros(rows, vocab, dtype=torch.bool)
    prompt[:, [1, 2]] = True
    pen = [i for i, p in enumerate(PARAM_MIX) if p.needs_penalties]
    legacy = SamplingBatch(
        temperature=torch.tensor([p.temperature for p in PARAM_MIX]),
        top_k=torch.tensor([p.top_k if p.top_k < vocab else 0 for p in PARAM_MIX]),
        top_p=torch.tensor([p.top_p for p in PARAM_MIX]), min_p=torch.tensor([p.min_p for p in PARAM_MIX]),
        keys=keys, positions=torch.full((rows,), 3), all_greedy=False, any_top_k=True, any_top_p=True,
        any_min_p=True,
        penalties=Penalties(rows=torch.tensor(pen), prompt_mask=prompt[pen], output_counts=counts[pen],
                            repetition=torch.tensor([PARAM_MIX[i].repetition_penalty for i in pen]),
                            presence=torch.tensor([PARAM_MIX[i].presence_penalty for i in pen]),
                            frequency=torch.tensor([PARAM_MIX[i].frequency_penalty for i in pen])),
        banned=[(i, sorted({*p.stop_token_ids, EOS})) for i, p in enumerate(PARAM_MIX) if p.min_tokens > 3],
    )
    assert torch.equal(sample(logits, legacy), got)


# -- the Sampler: slot lifecycle on the device (here the CPU reference) -------------------------------
def _steps(sampler, slots, steps, seed, vocab):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        out.append(sampler.sample(torch.randn(len(slots), vocab, generator=g) * 2, torch.tensor(slots)))
    return torch.stack(out, 1)  # [rows, steps]


def test_slot_state_counts_every_recorded_token():
    vocab = 30
    sampler = Sampler(8, vocab, "cpu")
    pen = SP(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.3)
    sampler.set_slot(3, pen, row_key(1, 0), prompt_token_ids=[4, 4, 5], output_token_ids=[7, 7])
    sampler.set_slot(6, SP(temperature=0.0, presence_penalty=0.5), row_key(2, 0), [1])
    sampler.set_slot(0, SP(temperature=0.9, top_p=0.9), row_key(3, 0), [1])
    tokens = _steps(sampler, [3, 6, 0], steps=6, seed=0, vocab=vocab)
    pos, counts = sampler.slot_state(3)
    assert pos == 8
    assert counts == dict(Counter([7, 7] + tokens[0].tolist()))
    assert sampler.slot_state(6) == (6, dict(Counter(tokens[1].tolist())))
    assert sampler.slot_state(0) == (6, {})  # no penalties: no counts kept


def test_resuming_a_slot_continues_the_same_tokens():
    """Preempted after 3 of 7 tokens, reloaded (on another sampler, another slot) with the 3 it
    had: the last 4 tokens come out the same, penalties and seeded noise included."""
    vocab = 40
    params = SP(temperature=1.0, top_k=20, repetition_penalty=1.3, presence_penalty=0.4, min_tokens=5,
                stop_token_ids=(2,))
    a = Sampler(4, vocab, "cpu")
    a.set_slot(1, params, row_key(9, 0), prompt_token_ids=[3, 4])
    full = _steps(a, [1], steps=7, seed=5, vocab=vocab)[0].tolist()
    g = torch.Generator().manual_seed(5)
    logits = [torch.randn(1, vocab, generator=g) * 2 for _ in range(7)]
    b = Sampler(16, vocab, "cpu")
    b.set_slot(12, params, row_key(9, 0), prompt_token_ids=[3, 4], output_token_ids=full[:3])
    rest = [int(b.sample(x, torch.tensor([12]))[0]) for x in logits[3:]]
    assert rest == full[3:]


def test_fork_copies_the_state_and_draws_with_its_own_key():
    vocab = 50
    params = SP(temperature=1.0, frequency_penalty=1.0)
    s = Sampler(4, vocab, "cpu")
    s.set_slot(0, params, row_key(7, 0), prompt_token_ids=[1])
    first = _steps(s, [0], steps=2, seed=1, vocab=vocab)[0].tolist()
    s.fork_slot(0, 2, row_key(7, 1))
    assert s.slot_state(2) == s.slot_state(0) == (2, dict(Counter(first)))
    fresh = Sampler(4, vocab, "cpu")  # what the child must equal: its own key, the same history
    fresh.set_slot(2, params, row_key(7, 1), prompt_token_ids=[1], output_token_ids=first)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        logits = torch.randn(2, vocab, generator=g) * 2
        parent, child = s.sample(logits, torch.tensor([0, 2])).tolist()
        assert child == int(fresh.sample(logits[1:], torch.tensor([2]))[0])
    assert s.slot_state(2) == fresh.slot_state(2) != s.slot_state(0)


def test_penalty_rows_are_pooled_and_reused():
    s = Sampler(10, 20, "cpu")
    for slot in range(10):
        s.set_slot(slot, SP(temperature=1.0, presence_penalty=0.5 if slot < 2 else 0.0), slot, [1])
    assert s.tables.occ.shape[0] == 4  # grown on demand for the two penalised slots
    s.clear_slot(0)
    s.set_slot(5, SP(repetition_penalty=1.5), 5, [1])  # reuses the freed row, pool unchanged
    assert s.tables.occ.shape[0] == 4 and s.slot_state(5) == (0, {})
    with pytest.raises(ValueError, match="slot 0 is not set"):
        s.clear_slot(0)


def test_penalties_are_exact_in_the_distribution():
    vocab = 6
    s = Sampler(2, vocab, "cpu")
    p = SP(temperature=1.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    s.set_slot(0, p, 1, prompt_token_ids=[0, 4], output_token_ids=[1, 1, 3])
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    want = torch.tensor([[1.0, -2.0 - 0.5 - 0.5, 0.5, 1.5 - 0.5 - 0.25, -4.0, 1.0]]).softmax(-1)
    torch.testing.assert_close(s.probs(logits, torch.tensor([0])), want)


def test_all_greedy_batch_is_one_argmax_and_changes_nothing():
    s = Sampler(3, 10, "cpu")
    s.set_slot(1, SP(temperature=0.0), 1, [1])
    logits = torch.randn(1, 10)
    assert torch.equal(s.sample(logits, torch.tensor([1])), logits.argmax(-1))
    assert s.slot_state(1) == (0, {})


def test_sampler_rejects_bad_input_with_clear_errors():
    s = Sampler(4, 10, "cpu")
    with pytest.raises(ValueError, match="slot 4 is outside"):
        s.set_slot(4, SP(), 1, [1])
    with pytest.raises(ValueError, match="prompt_token_ids: token id 10 is outside the vocabulary"):
        s.set_slot(0, SP(), 1, [10])
    with pytest.raises(ValueError, match="ban ids .* token id 12"):
        s.set_slot(0, SP(min_tokens=2, stop_token_ids=(12,)), 1, [1])
    s.set_slot(0, SP(stop_token_ids=(12,)), 1, [1])  # nothing to ban without min_tokens
    s.clear_slot(0)
    with pytest.raises(ValueError, match="key must be a 32-bit"):
        s.set_slot(0, SP(), 2**32, [1])
    with pytest.raises(ValueError, match="fork_slot: source slot 1 is not set"):
        s.fork_slot(1, 2, 3)
    s.set_slot(0, SP(), 1, [1])
    with pytest.raises(ValueError, match=r"logits must be \[rows, 10\]"):
        s.sample(torch.zeros(1, 11), torch.tensor([0]))
    with pytest.raises(ValueError, match="slots must be"):
        s.sample(torch.zeros(1, 10), torch.tensor([0.0]))
