"""The drafters' fixed-shape greedy chain (gpu_engine/spec/chain_graphs.py), run eagerly on the CPU:
the same drafts and the same draft-cache contents as the drafters' own chains, with padding rows,
rows that want fewer drafts than the chain makes, a prefix-hit head cache, and incremental calls.
(Its capture as CUDA graphs: tests/gpu/test_spec_engine_gpu.py.)"""

from __future__ import annotations

import pytest
import torch

from gpu_engine.spec.chain_graphs import ChainGraphs
from gpu_engine.spec.draft_model import DraftModelProposer, load_draft_model
from gpu_engine.spec.eagle3 import load_eagle3_head
from gpu_engine.spec.eagle3_proposer import Eagle3Proposer
from gpu_engine.spec.proposer import DraftBatch, DraftRequest
from taxiway import LLM, SamplingParams
from tests.engine.spec_helpers import (
    ALWAYS,
    CPU,
    features,
    generate_checked,
    load_target,
    random_head,
    tokens_of,
)


@pytest.fixture(scope="module")
def target(tiny_llama):
    return load_target(tiny_llama)


def _pair(make):
    """An eager proposer and one whose greedy chains run the fixed-shape program."""
    eager, static = make(), make()
    assert static.build_chain(max_rows=4, steps=4, capture=False) == 0.0
    assert static.chain.sizes == [1, 2, 4]
    return eager, static


def _written(cache: torch.Tensor) -> torch.Tensor:
    """[blocks, block size] bool: the slots holding anything (the caches start zeroed)."""
    return cache.transpose(1, 2).flatten(2).ne(0).any(dim=2)


def same_proposals(eager, static, batch, atol=1e-5):
    """Both proposers' drafts for `batch` (equal), and their caches written at the same slots."""
    got, want = static.propose(batch), eager.propose(batch)
    assert got.token_ids == want.token_ids
    for (ke, ve), (ks, vs) in zip(eager.cache.kv, static.cache.kv):  # the chains wrote the same slots
        for e, st in ((ke, ks), (ve, vs)):  # [blocks, kv heads, block size, head dim]
            assert torch.equal(_written(e), _written(st))
            assert torch.allclose(e, st, rtol=atol, atol=atol)  # (row counts differ: not bit-equal)
    static.cache.check_integrity()
    return got.token_ids


def test_eagle3_chain_program_drafts_as_the_eager_chain(tiny_llama, target, tmp_path):
    model, cfg = target
    head = load_eagle3_head(random_head(tiny_llama, tmp_path / "head"), cfg, torch.float32, CPU)
    eager, static = _pair(lambda: Eagle3Proposer(head, model.embed_tokens, 64, 4, 256, CPU))
    a = [3, 77, 12, 250, 41, 9, 130, 18, 66, 5]
    b = [8, 8, 100, 42, 17]
    c = [5, 9, 17, 3, 88, 41, 7]
    (fa, _), (fb, _), (fc, _) = features(model, [a, b, c], head.cfg.aux_layers)
    # three rows padded to four; b's head cache starts at 2 (a prefix hit covered 0, 1); drafts 4, 2, 1
    rows = torch.cat([fa[:9], fb[2:4], fc[:6]])
    first = same_proposals(eager, static, DraftBatch([
        DraftRequest(1, a, 4, hidden_rows=(0, 0, 9)), DraftRequest(2, b, 2, hidden_rows=(9, 2, 2)),
        DraftRequest(3, c, 1, hidden_rows=(11, 0, 6))], rows))
    assert [len(t) for t in first] == [4, 2, 1]
    # a accepts two drafts and a token of its own; b goes on alone
    a2 = a + first[0][:2] + [299]
    (fa2, _), = features(model, [a2], head.cfg.aux_layers)
    second = same_proposals(eager, static, DraftBatch([DraftRequest(1, a2, 3, hidden_rows=(0, 9, 3))], fa2[9:12]))
    assert len(second[0]) == 3


def test_draft_model_chain_program_drafts_as_the_eager_chain(tiny_llama, target):
    _, cfg = target
    draft = load_draft_model(tiny_llama, cfg, torch.float32, CPU)
    eager, static = _pair(lambda: DraftModelProposer(draft, 32, 4, 256, CPU, cfg.vocab_size))
    a = [5, 9, 17, 3, 88, 41, 7, 120, 33, 2]
    b = [5, 9, 17, 3, 88, 41, 7, 120, 99, 1, 4]
    first = same_proposals(eager, static, DraftBatch([DraftRequest(1, a, 4), DraftRequest(2, b, 2),
                                             DraftRequest(3, [8, 8, 6], 3)]))
    a2 = a + first[0][:1] + [6]
    same_proposals(eager, static, DraftBatch([DraftRequest(2, b + first[1], 4), DraftRequest(1, a2, 3)]))


def test_sampled_or_too_many_rows_take_the_eager_chain(tiny_llama, target):
    _, cfg = target
    draft = load_draft_model(tiny_llama, cfg, torch.float32, CPU)
    _, static = _pair(lambda: DraftModelProposer(draft, 32, 4, 256, CPU, cfg.vocab_size))
    calls = []
    real = ChainGraphs.program
    static.chain.program = lambda size: calls.append(size) or real(static.chain, size)
    prompt = [5, 9, 17, 3, 88, 41]
    sampled = static.propose(DraftBatch([DraftRequest(1, prompt, 3, temperature=0.8, key=3)]))
    assert sampled.draft_probs is not None and calls == []
    many = [DraftRequest(10 + i, prompt[: 2 + i], 2) for i in range(5)]
    assert all(len(t) == 2 for t in static.propose(DraftBatch(many)).token_ids) and calls == []
    assert len(static.propose(DraftBatch(many[:3])).token_ids[0]) == 2 and calls == [4]


def test_the_chain_refuses_what_it_cannot_hold(tiny_llama, target):
    _, cfg = target
    draft = load_draft_model(tiny_llama, cfg, torch.float32, CPU)
    p = DraftModelProposer(draft, 32, 4, 256, CPU, cfg.vocab_size)
    with pytest.raises(ValueError, match="steps >= 1"):
        p.build_chain(max_rows=4, steps=0, capture=False)
    p.build_chain(max_rows=2, steps=2, capture=False)
    with pytest.raises(ValueError, match="3 rows exceed the chain's 2"):
        p.chain.run((torch.zeros(3, cfg.hidden_size),), [1, 2, 3], [0, 0, 0], [1, 1, 1])


def test_engine_greedy_output_is_unchanged_by_the_chain_program(tiny_llama):
    """The whole loop with the program as the chain (as on a GPU, eagerly here), the target as its own
    draft: the same tokens as without speculation, every draft accepted, blocks checked each step."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[5, 9, 17, 3, 88, 41, 7], [8, 8, 100, 42, 17, 6, 6, 6], [3, 77, 12]]
    plain = tokens_of(LLM(tiny_llama, device="cpu", num_kv_blocks=64).generate(prompts, params))
    spec = {"method": "draft_model", "model": tiny_llama, "num_speculative_tokens": 3, **ALWAYS}
    llm = LLM(tiny_llama, device="cpu", num_kv_blocks=64, speculative_config=spec)
    calls = []
    chain = llm.engine.spec.proposer
    chain.build_chain(max_rows=4, steps=3, capture=False)
    real = ChainGraphs.program
    chain.chain.program = lambda size: calls.append(size) or real(chain.chain, size)
    outs = generate_checked(llm, prompts, params)
    assert tokens_of(outs) == plain
    assert all(o.num_draft_tokens > 0 and o.num_accepted_tokens == o.num_draft_tokens for o in outs)
    assert calls and set(calls) <= {1, 2, 4}
    chain.cache.check_integrity()
