"""The rejection sampler keeps the target's distribution: many speculative generations of a small
Markov chain (target T, drafter Q) against the exact joint distribution, chi-square; point-mass
drafts reproduce plain seeded sampling token for token; the greedy rule; errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from gpu_engine.sampler import row_key
from gpu_engine.spec.rejection import VerifyLayout, exponential_race, rejection_sample

V = 4
GEN_LEN = 3
TRIALS = 12000


def _chain(seed: int, zeros: bool = False) -> torch.Tensor:
    """A [V, V] row-stochastic matrix; with zeros, each row keeps only 2 tokens (like top-k)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(V, V, generator=g) + 0.05
    if zeros:
        keep = torch.rand(V, V, generator=g).argsort(dim=1) < 2
        m = m * keep
    return m / m.sum(dim=1, keepdim=True)


def _keys(n: int, base: int) -> torch.Tensor:
    return torch.tensor([row_key(base + i, 0) for i in range(n)], dtype=torch.int64)


def _speculate(target: torch.Tensor, draft: torch.Tensor | None, k: int, keys: torch.Tensor,
               dense: bool, greedy: bool = False, draft_seed: int = 7) -> tuple[torch.Tensor, float]:
    """GEN_LEN tokens after token 0 for every trial, k drafts per step. draft None: random point-mass
    drafts. Returns (tokens [S, GEN_LEN], acceptance rate of the first draft of the first step)."""
    s = keys.shape[0]
    g = torch.Generator().manual_seed(draft_seed)
    out = torch.full((s, GEN_LEN), -1, dtype=torch.int64)
    count = torch.zeros(s, dtype=torch.int64)
    last = torch.zeros(s, dtype=torch.int64)
    first_accept = None
    layout = VerifyLayout.build([k] * s, torch.device("cpu"))
    while bool((count < GEN_LEN).any()):
        prev, drafts, qs = last, [], []
        for _ in range(k):
            if draft is None:
                d = torch.randint(0, V, (s,), generator=g)
            else:
                d = torch.multinomial(draft[prev], 1, generator=g).squeeze(1)
                qs.append(draft[prev])
            drafts.append(d)
            prev = d
        d_mat = torch.stack(drafts, dim=1)  # [S, k]
        ctx = torch.cat([last[:, None], d_mat], dim=1)  # token before each verified position
        p = target[ctx].reshape(s * (k + 1), V)
        q = torch.stack(qs, dim=1).reshape(s * k, V) if dense else None
        res = rejection_sample(p.float(), d_mat.reshape(-1), layout, torch.full((s,), greedy),
                               keys, count.clone(), q)
        if first_accept is None:
            first_accept = float((res.num_accepted > 0).float().mean())
        for j in range(k + 1):
            take = (j < res.num_emitted) & (count < GEN_LEN)
            rows = take.nonzero().squeeze(1)
            out[rows, count[rows]] = res.token_ids[rows, j]
            count[rows] += 1
        last = out.gather(1, (count - 1).clamp(min=0)[:, None]).squeeze(1)
    return out, first_accept


def _exact_joint(target: torch.Tensor) -> np.ndarray:
    t = target.double().numpy()
    probs = []
    for seq in itertools.product(range(V), repeat=GEN_LEN):
        prob, prev = 1.0, 0
        for tok in seq:
            prob *= t[prev, tok]
            prev = tok
        probs.append(prob)
    return np.array(probs)


def _counts(tokens: torch.Tensor) -> np.ndarray:
    idx = np.zeros(tokens.shape[0], dtype=np.int64)
    for j in range(GEN_LEN):
        idx = idx * V + tokens[:, j].numpy()
    return np.bincount(idx, minlength=V**GEN_LEN)


def _assert_matches(tokens: torch.Tensor, target: torch.Tensor) -> None:
    assert (tokens >= 0).all()
    expected = _exact_joint(target) * tokens.shape[0]
    observed = _counts(tokens)
    support = expected > 0
    assert observed[~support].sum() == 0, "a token sequence the target gives probability 0 was emitted"
    exp = expected[support] * observed.sum() / expected[support].sum()  # rounding of tiny masses
    stat, pvalue = chisquare(observed[support], exp)
    assert pvalue > 1e-3, f"emitted distribution differs from the target's (chi2 {stat:.1f}, p {pvalue:.2e})"


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("pair", ["close", "far", "target_zeros", "draft_zeros"])
def test_dense_drafts_keep_the_target_distribution(k, pair):
    target, draft = {
        "close": (_chain(1), (_chain(1) * 0.8 + _chain(2) * 0.2)),
        "far": (_chain(3), _chain(4)),
        "target_zeros": (_chain(5, zeros=True), _chain(6)),
        "draft_zeros": (_chain(7), _chain(8, zeros=True)),
    }[pair]
    tokens, first = _speculate(target, draft, k, _keys(TRIALS, 1000 * k), dense=True)
    _assert_matches(tokens, target)
    # The first draft is accepted with probability sum_x min(p(x), q(x)) (p, q: rows of token 0).
    theory = float(torch.minimum(target[0], draft[0]).sum())
    assert abs(first - theory) < 0.025, (first, theory)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("zeros", [False, True])
def test_point_mass_drafts_keep_the_target_distribution(k, zeros):
    target = _chain(11, zeros=zeros)
    tokens, first = _speculate(target, None, k, _keys(TRIALS, 77), dense=False)
    _assert_matches(tokens, target)
    theory = float(target[0].mean())  # a uniformly random draft d is accepted with p(d)
    assert abs(first - theory) < 0.025, (first, theory)


def test_point_mass_drafts_reproduce_plain_seeded_sampling():
    """With the sampler's own noise per output position, speculation changes no token."""
    target, draft = _chain(21), _chain(22)
    keys = _keys(2000, 5)
    spec, _ = _speculate(target, None, 3, keys, dense=False)
    plain = torch.empty_like(spec)
    last = torch.zeros(keys.shape[0], dtype=torch.int64)
    for pos in range(GEN_LEN):
        last = exponential_race(target[last], keys, torch.full_like(keys, pos))
        plain[:, pos] = last
    assert torch.equal(spec, plain)
    again, _ = _speculate(target, draft, 3, keys, dense=False, draft_seed=99)
    assert torch.equal(again, plain)  # other drafts, the same tokens


def test_greedy_accepts_while_the_draft_is_the_argmax():
    p = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4],
                      [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]])
    # sequence 0: drafts [1, 0, 1] -> 1, 0 accepted, 1 rejected -> argmax 2: emits [1, 0, 2]
    # sequence 1: drafts [0, 2] against rows 4, 5 -> all accepted, bonus argmax of row 6 = 1
    drafts = torch.tensor([1, 0, 1, 0, 2])
    layout = VerifyLayout.build([3, 2], torch.device("cpu"))
    for q in (None, torch.full((5, 3), 1 / 3)):
        res = rejection_sample(p, drafts, layout, torch.tensor([True, True]), _keys(2, 0),
                               torch.tensor([0, 10]), q)
        assert res.token_ids.tolist() == [[1, 0, 2, -1], [0, 2, 1, -1]]
        assert res.num_emitted.tolist() == [3, 3]
        assert res.num_accepted.tolist() == [2, 2]
    # all greedy (the host knows): raw scores with the same argmax give the same tokens, no noise drawn
    res = rejection_sample((p * 10).log() - 3.0, drafts, layout, torch.tensor([True, True]), _keys(2, 0),
                           torch.tensor([0, 10]), all_greedy=True)
    assert res.token_ids.tolist() == [[1, 0, 2, -1], [0, 2, 1, -1]] and res.num_emitted.tolist() == [3, 3]


def test_sequences_without_drafts_draw_one_token():
    one_hot = torch.eye(3)
    p = one_hot[[1, 2, 2, 2, 0]]  # rows: seq 0 bonus; seq 1 two drafts + bonus; seq 2 bonus
    layout = VerifyLayout.build([0, 2, 0], torch.device("cpu"))
    res = rejection_sample(p, torch.tensor([2, 2]), layout, torch.tensor([False, False, False]),
                           _keys(3, 0), torch.zeros(3, dtype=torch.int64))
    assert res.token_ids.tolist() == [[1, -1, -1], [2, 2, 2], [0, -1, -1]]
    assert res.num_emitted.tolist() == [1, 3, 1]
    none = VerifyLayout.build([0, 0], torch.device("cpu"))
    res = rejection_sample(p[:2], torch.zeros(0, dtype=torch.int64), none, torch.tensor([True, False]),
                           _keys(2, 0), torch.zeros(2, dtype=torch.int64))
    assert res.token_ids.tolist() == [[1], [2]]
    assert res.num_emitted.tolist() == [1, 1]


def test_seeded_requests_are_reproducible_and_streams_differ():
    target, draft = _chain(31), _chain(32)
    keys = _keys(500, 3)
    a, _ = _speculate(target, draft, 3, keys, dense=True)
    b, _ = _speculate(target, draft, 3, keys, dense=True)
    assert torch.equal(a, b)
    c, _ = _speculate(target, draft, 3, _keys(500, 4000), dense=True)
    assert not torch.equal(a, c)


def test_bad_inputs_name_the_value_and_the_expectation():
    layout = VerifyLayout.build([2], torch.device("cpu"))
    p = torch.full((3, 4), 0.25)
    args = dict(greedy=torch.tensor([False]), keys=_keys(1, 0), positions=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"target_probs must be \[3, vocab\]"):
        rejection_sample(p[:2], torch.tensor([0, 1]), layout, **args)
    with pytest.raises(ValueError, match="target_probs must be float32"):
        rejection_sample(p.double(), torch.tensor([0, 1]), layout, **args)
    with pytest.raises(ValueError, match=r"draft_token_ids must be int64 \[2\]"):
        rejection_sample(p, torch.tensor([0]), layout, **args)
    with pytest.raises(ValueError, match=r"draft_probs must be float32 \[2, 4\]"):
        rejection_sample(p, torch.tensor([0, 1]), layout, draft_probs=torch.ones(2, 3), **args)
    with pytest.raises(ValueError, match=r"keys must be torch.int64 \[1\]"):
        rejection_sample(p, torch.tensor([0, 1]), layout, greedy=args["greedy"], keys=_keys(2, 0),
                         positions=args["positions"])
    with pytest.raises(ValueError, match="non-negative"):
        VerifyLayout.build([1, -1], torch.device("cpu"))


@pytest.mark.parametrize("seed", range(6))
def test_point_mass_assembly_matches_the_general_rule(seed):
    """Point-mass drafts take a short path (emit the drawn tokens up to the first mismatch); it
    agrees with the general accept / correct / bonus assembly on random draws, uneven k (zeros too)."""
    from gpu_engine.spec.rejection import _assemble, _assemble_point_mass

    g = torch.Generator().manual_seed(seed)
    ks = torch.randint(0, 5, (7,), generator=g).tolist()
    layout = VerifyLayout.build(ks, torch.device("cpu"))
    drafts = torch.randint(0, 3, (sum(ks),), generator=g)
    drawn = torch.randint(0, 3, (sum(ks) + len(ks),), generator=g)  # 3 tokens: many partial accepts
    at = drawn[layout.draft_row]
    want = _assemble(layout, drafts, at == drafts, at, drawn[layout.bonus_row])
    got = _assemble_point_mass(layout, drafts, drawn)
    assert torch.equal(got.token_ids, want.token_ids) and torch.equal(got.num_emitted, want.num_emitted)


def test_one_upload_carries_the_layout_and_the_step_s_arrays():
    calls = []

    def upload(a):
        calls.append(a.shape)
        return torch.from_numpy(a)

    layout, (rows, ids) = VerifyLayout.build_with([2, 0, 1], torch.device("cpu"), upload,
                                                  (np.array([4, 5, 6, 9, 10, 11]), np.array([[7, 8, 3]])))
    assert len(calls) == 1
    assert rows.tolist() == [4, 5, 6, 9, 10, 11] and ids.tolist() == [[7, 8, 3]]
    assert layout.seq_row.tolist() == [[0, 1, 2], [3, 3, 3], [4, 5, 5]]
    assert layout.seq_valid.tolist() == [[True, True], [False, False], [True, False]]
    assert layout.columns.tolist() == [0, 1, 2] and layout.bonus_row.tolist() == [2, 3, 5]
