"""The sampling kernels (taxiway_kernels/sampling.py) against the plain-torch reference, through Sampler.

CPU interpreter on small vocabularies with small tiles (several chunks per row, narrow bands, a
tiny band capacity that forces the slow path); real vocabularies and batch sizes on a GPU.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("triton")

from gpu_engine.sampler import Sampler, row_key  # noqa: E402
from gpu_engine.sampling_params import SamplingParams as SP  # noqa: E402
from taxiway_kernels import reference_sampling as L  # noqa: E402
from taxiway_kernels.sampling import (  # noqa: E402
    SamplingKernelConfig,
    SamplingWorkspace,
    probs_slots,
    sample_slots,
)
from tests.sampling_cases import PARAM_MIX, assert_tokens_match, fill, race_scores  # noqa: E402

# Interpreter configs: 128-column chunks (a 300-token row spans 3, the last partial), 16 rows per
# program (interpreted programs are slow), bands of 128 tokens; TINY_CAP sends most rows to the
# slow path; ONE_ROUND leaves wider bands.
SMALL = SamplingKernelConfig(chunk=128, block=64, pivot_block=32, pivots=8, rounds=2, band_cap=128,
                             band_block=64, rows_per_program=16)
TINY_CAP = dataclasses.replace(SMALL, band_cap=4)
ONE_ROUND = dataclasses.replace(SMALL, rounds=1, pivots=4)


def _pair(vocab: int, device, cfg: SamplingKernelConfig, max_slots: int = 64, max_stop_ids: int = 4):
    ref = Sampler(max_slots, vocab, device, backend="torch", max_stop_ids=max_stop_ids)
    ker = Sampler(max_slots, vocab, device, backend="triton", kernel_config=cfg, max_stop_ids=max_stop_ids)
    return ref, ker


def _logits(rows: int, vocab: int, seed: int, device, kind: str = "mixed") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g)
    if kind == "mixed":  # rows from flat (dummy weights) to peaked (a trained model's)
        x = x * torch.linspace(0.3, 4.0, rows)[:, None]
        x[:, :10] += 4 * torch.rand(rows, 10, generator=g)
    elif kind == "ties":  # many exactly equal scores
        x = torch.randint(-3, 4, (rows, vocab), generator=g).float()
    return x.to(device)


def _run_steps(ref, ker, slots, vocab, steps, seed, device, kind="mixed"):
    paths = []
    for step in range(steps):
        logits = _logits(slots.numel(), vocab, seed + step, device, kind)
        race = race_scores(ref, logits, slots)
        want = ref.sample(logits, slots)
        got = ker.sample(logits, slots)
        assert_tokens_match(got, race)
        assert torch.equal(want, race.argmax(-1))
        # an all-greedy batch never reaches the kernel (the sampler's argmax shortcut): path 0
        ran = ker._ws is not None and ker._ws.rows > 0
        paths.append(ker._ws.paths(slots.numel()).clone() if ran else
                     torch.zeros(slots.numel(), dtype=torch.int32, device=device))
        if not torch.equal(got, want):  # a near tie went the other way: keep the two in step
            ker.tables.occ.copy_(ref.tables.occ)
    return torch.stack(paths)


@pytest.mark.slow
@pytest.mark.parametrize("cfg,kind", [(SMALL, "mixed"), (TINY_CAP, "mixed"), (ONE_ROUND, "ties")],
                         ids=["small", "tiny-cap", "one-round-ties"])
def test_kernel_matches_reference_on_a_mixed_batch(cfg, kind, device):
    vocab = 300
    ref, ker = _pair(vocab, device, cfg)
    params = PARAM_MIX
    slots = torch.randperm(64, generator=torch.Generator().manual_seed(1))[: len(params)]
    for s in (ref, ker):
        fill(s, params, slots.tolist())
    slots = slots.to(device)
    paths = _run_steps(ref, ker, slots, vocab, steps=2, seed=10, device=device, kind=kind)
    greedy = torch.tensor([p.temperature == 0 for p in params], device=device)
    assert bool((paths[:, greedy] == 0).all())
    if cfg is TINY_CAP:
        assert bool((paths == 3).any()), "the tiny band capacity must send rows to the slow path"
    else:
        assert bool((paths == 2).any())
    for slot in slots.tolist():
        assert ker.slot_state(slot) == ref.slot_state(slot)
    logits = _logits(len(params), vocab, 99, device, kind)
    torch.testing.assert_close(ker.probs(logits, slots), ref.probs(logits, slots), atol=2e-6, rtol=1e-4)


@pytest.mark.slow
def test_filtered_tokens_are_never_emitted(device):
    """One logits row drawn 96 times (positions differ): every token lies in the set computed by
    hand: top-k 6, then top-p 0.7 of those survivors, then min-p 0.2."""
    vocab = 200
    base = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 2
    p = SP(temperature=0.9, top_k=6, top_p=0.7, min_p=0.2)
    s = base / 0.9
    top6 = s.topk(6).indices.tolist()
    probs6 = s[top6].softmax(-1)
    allowed, mass = [], 0.0
    for t, q in zip(top6, probs6.tolist()):
        if mass >= 0.7:
            break
        allowed.append(t)
        mass += q
    allowed = {t for t in allowed if math.exp(float(s[t] - s.max())) >= 0.2}
    sampler = Sampler(96, vocab, device, backend="triton", kernel_config=SMALL)
    for slot in range(96):
        sampler.set_slot(slot, p, row_key(slot, 0), prompt_token_ids=[1])
    drawn = sampler.sample(base.repeat(96, 1).to(device), torch.arange(96, device=device))
    assert set(drawn.tolist()) == allowed


def test_bans_hold_until_min_tokens_then_lift(device):
    """The banned id is the argmax; banned for positions 0-2, drawn at 3 (list and overflow rows)."""
    vocab = 64
    logits = torch.zeros(2, vocab, device=device)
    logits[:, 9] = 30.0
    sampler = Sampler(4, vocab, device, backend="triton", kernel_config=SMALL, max_stop_ids=2)
    sampler.set_slot(0, SP(temperature=1.0, min_tokens=3, stop_token_ids=(9,)), 1, [1], eos_token_ids=[0])
    sampler.set_slot(1, SP(temperature=0.0, min_tokens=3, stop_token_ids=(9, 3, 4)), 2, [1],
                     eos_token_ids=[0])  # 4 ids > max_stop_ids: kept as bits in a pool row
    slots = torch.tensor([0, 1], device=device)
    drawn = [sampler.sample(logits, slots).tolist() for _ in range(4)]
    assert all(9 not in d for d in drawn[:3]) and drawn[3] == [9, 9]


def test_chi_square_against_the_softmax_and_the_filtered_distribution(device):
    """768 draws of one row (positions differ) per case, 7 degrees of freedom: 0.1% critical value
    24.3. Plain temperature (the stats pass's race) and top-k + top-p (the band path)."""
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 0.7, 1.3, -3.0, -2.0, -2.5, -4.0])
    draws, temperature = 768, 0.8
    cfg = SamplingKernelConfig(chunk=16, block=16, pivot_block=16, pivots=8, band_cap=16, band_block=16,
                               rows_per_program=128)
    s = logits / temperature
    for params, keep in ((SP(temperature=temperature), torch.ones(12, dtype=torch.bool)),
                         (SP(temperature=temperature, top_k=9, top_p=0.97), None)):
        sampler = Sampler(draws, 12, device, backend="triton", kernel_config=cfg)
        for slot in range(draws):
            sampler.set_slot(slot, params, row_key(77, slot), prompt_token_ids=[1])
        tokens = sampler.sample(logits.to(device).expand(draws, 12), torch.arange(draws, device=device))
        if keep is None:
            keep = L.keep_mask(s[None], torch.tensor([9]), torch.tensor([0.97]), torch.tensor([-math.inf]))[0]
            assert 1 < int(keep.sum()) < 12  # some tokens dropped, several kept
        expected = torch.where(keep, s, -math.inf).softmax(-1).double() * draws
        observed = torch.bincount(tokens.cpu(), minlength=12).double()
        assert float(observed[~keep].sum()) == 0.0
        top = keep & (expected > 0)
        chi2 = float(((observed[top] - expected[top]) ** 2 / expected[top]).sum())
        assert chi2 < 24.3, f"chi2={chi2}, observed={observed.tolist()}, expected={expected.tolist()}"


@pytest.mark.slow
def test_seeded_tokens_do_not_depend_on_the_batch(device):
    """The same four requests, alone in slots 0-3 and then scattered among 12 others in a shuffled
    batch of another size: same tokens, step after step."""
    vocab = 300
    mine = [PARAM_MIX[i] for i in (2, 4, 7, 13)]
    alone = Sampler(32, vocab, device, backend="triton", kernel_config=SMALL)
    crowd = Sampler(32, vocab, device, backend="triton", kernel_config=SMALL)
    fill(alone, mine, [0, 1, 2, 3])
    fill(crowd, PARAM_MIX[:12], list(range(16, 28)), seed=9)
    fill(crowd, mine, [30, 5, 11, 2])
    order = torch.randperm(16, generator=torch.Generator().manual_seed(4))
    crowd_slots = torch.tensor(list(range(16, 28)) + [30, 5, 11, 2])[order].to(device)
    where_mine = [int((order == 12 + i).nonzero()) for i in range(4)]
    g = torch.Generator().manual_seed(8)
    for _ in range(2):
        mine_logits = torch.randn(4, vocab, generator=g) * 2
        big = torch.randn(16, vocab, generator=g) * 2
        big[where_mine] = mine_logits
        a = alone.sample(mine_logits.to(device), torch.arange(4, device=device))
        b = crowd.sample(big.to(device), crowd_slots)
        assert torch.equal(a, b[where_mine])


def test_wrapper_rejects_bad_inputs(device):
    s = Sampler(4, 50, device, backend="triton", kernel_config=SMALL)
    s.set_slot(0, SP(temperature=1.0), 1, [1])
    ws, t = SamplingWorkspace(device, SMALL), s.tables
    logits, slots = torch.zeros(1, 50, device=device), torch.zeros(1, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="logits has dtype torch.int64"):
        sample_slots(logits.long(), slots, t, ws)
    with pytest.raises(ValueError, match="slots has shape"):
        sample_slots(logits, slots.repeat(2), t, ws)
    with pytest.raises(ValueError, match="occ must be a contiguous"):
        probs_slots(torch.zeros(1, 49, device=device), slots, t, ws)
    with pytest.raises(ValueError, match="stride 1"):
        sample_slots(torch.zeros(50, 2, device=device).t(), slots.repeat(2), t, ws)
    with pytest.raises(ValueError, match="pivot_block .* multiple|multiple of block"):
        SamplingKernelConfig(chunk=64, block=128)
    with pytest.raises(ValueError, match="power of 2"):
        SamplingKernelConfig(pivots=12)


# -- on a GPU: real vocabularies and batch sizes -------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [128256, 151936])
@pytest.mark.parametrize("rows", [1, 64, 512, 4096])
def test_gpu_real_shapes_match_reference(vocab, rows):
    ref, ker = _pair(vocab, "cuda", SamplingKernelConfig(), max_slots=rows, max_stop_ids=16)
    params = [PARAM_MIX[i % len(PARAM_MIX)] for i in range(rows)]
    slots = torch.randperm(rows, generator=torch.Generator().manual_seed(rows))
    for s in (ref, ker):
        fill(s, params, slots.tolist())
    slots = slots.cuda()
    paths = _run_steps(ref, ker, slots, vocab, steps=2, seed=rows, device="cuda")
    assert float((paths == 3).float().mean()) < 0.05, f"slow path share {(paths == 3).float().mean():.3f}"
    logits = _logits(rows, vocab, 7, "cuda")
    torch.testing.assert_close(ker.probs(logits, slots), ref.probs(logits, slots), atol=1e-5, rtol=1e-3)


@pytest.mark.gpu
def test_gpu_chi_square_at_full_vocabulary():
    """100k draws of one 128,256-token row (a stride-0 batch); chi-square over the 30 most likely
    tokens and the rest pooled (30 degrees of freedom, 0.1% critical value 59.7), plain and
    top-k/top-p filtered."""
    vocab, draws = 128256, 100_000
    base = torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * 2.5
    for params in (SP(temperature=0.9), SP(temperature=0.9, top_k=50, top_p=0.9)):
        sampler = Sampler(draws, vocab, "cuda")
        for slot in range(draws):
            sampler.set_slot(slot, params, row_key(3, slot), prompt_token_ids=[1])
        logits = base.cuda().expand(draws, vocab)  # row stride 0: one row in memory
        tokens = sampler.sample(logits, torch.arange(draws, device="cuda")).cpu()
        p = Sampler(1, vocab, "cpu")
        p.set_slot(0, params, 1, [1])
        want = p.probs(base[None], torch.zeros(1, dtype=torch.int64))[0].double()
        assert float(want[torch.bincount(tokens, minlength=vocab) > 0].min()) > 0  # nothing excluded
        top = want.topk(30).indices
        observed = torch.bincount(tokens, minlength=vocab).double()
        obs = torch.cat([observed[top], (observed.sum() - observed[top].sum())[None]])
        exp = torch.cat([want[top], (1 - want[top].sum()).clamp(min=1e-12)[None]]) * draws
        keep = exp > 5
        chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
        assert chi2 < 59.7, f"{params}: chi2={chi2}"


def test_verify_probs_on_the_kernels_equal_the_reference(device):
    """Speculative verify rows (each a slot's draw some tokens further on, earlier drafts counted for
    penalties) through the sampling kernels, as on a GPU, equal the torch reference's."""
    import numpy as np

    vocab = 300
    ref, ker = _pair(vocab, device, SMALL, max_slots=16)
    params = PARAM_MIX[:9]
    for s in (ref, ker):
        fill(s, params, list(range(9)))
    # four entries of 1 + 2 rows: greedy, top-p, penalties, presence penalty with min_tokens bans
    row_slots = np.repeat(np.array([0, 3, 7, 8], dtype=np.int64), 3)
    row_offsets = np.tile(np.arange(3, dtype=np.int64), 4)
    prior = (np.array([1, 2, 2, 4, 5, 5], dtype=np.int64), np.array([7, 7, 9, 12, 30, 31], dtype=np.int64))
    logits = _logits(len(row_slots), vocab, 7, device)
    want = ref.verify_probs(logits, row_slots, row_offsets, prior)
    got = ker.verify_probs(logits, row_slots, row_offsets, prior)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-4)


def test_warm_up_leaves_the_samplers_slots_and_draws_unchanged(device):
    """Sampler.warm_up runs every kernel configuration on a scratch sampler: the slots set before
    it draw exactly what an untouched sampler's do, and its tables are unchanged."""
    vocab = 300
    warmed, untouched = (Sampler(8, vocab, device, backend="triton", kernel_config=SMALL) for _ in range(2))
    for s in (warmed, untouched):
        s.set_slot(0, SP(temperature=0.9, top_p=0.8, presence_penalty=0.5), row_key(3, 0), prompt_token_ids=[5, 6])
        s.set_slot(3, SP(temperature=0.7, top_k=20), row_key(4, 0), prompt_token_ids=[1])
    before = [t.clone() for t in (warmed.tables.fparams, warmed.tables.iparams, warmed.tables.stop_ids)]
    warmed.warm_up(probs=True)
    after = (warmed.tables.fparams, warmed.tables.iparams, warmed.tables.stop_ids)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    slots = torch.tensor([3, 0], device=device)
    for step in range(3):
        logits = _logits(2, vocab, 40 + step, device)
        assert torch.equal(warmed.sample(logits, slots), untouched.sample(logits, slots))
