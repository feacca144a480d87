"""Draft-model proposer: its drafts are the draft model's greedy continuation, its own KV cache
follows the accepted tokens (exact block ids, prefix cache), sampled drafts carry q."""

from __future__ import annotations

import pytest
import torch

from gpu_engine.spec.draft_model import DraftModelProposer, load_draft_model
from gpu_engine.spec.proposer import DraftBatch, DraftRequest
from taxiway import LLM, SamplingParams
from tests.engine.spec_helpers import CPU, load_target


@pytest.fixture(scope="module")
def draft(tiny_llama):
    model, cfg = load_target(tiny_llama)
    return load_draft_model(tiny_llama, cfg, torch.float32, CPU), cfg


@pytest.fixture(scope="module")
def greedy(tiny_llama):
    llm = LLM(tiny_llama, device="cpu", num_kv_blocks=64)

    def run(tokens, n):
        out = llm.generate([list(tokens)], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return out[0].outputs[0].token_ids
    return run


def _proposer(draft, num_blocks=32):
    model, cfg = draft
    return DraftModelProposer(model, num_blocks, 4, 256, CPU, cfg.vocab_size)


def _one(p, seq_id, tokens, k, **kw):
    return p.propose(DraftBatch([DraftRequest(seq_id, tokens, k, **kw)])).token_ids[0]


def test_drafts_are_the_draft_models_greedy_continuation(draft, greedy):
    p = _proposer(draft)
    prompt = [5, 9, 17, 3, 88, 41, 7, 120, 33, 2]
    got = _one(p, 1, prompt, 4)
    assert got == greedy(prompt, 4)
    state = p.cache._seqs[1]
    # positions 0..9 (prompt) and 10..12 (drafts 1..3 fed back): 13 slots in 4 blocks of 4
    assert state.block_table == [0, 1, 2, 3] and state.held == prompt + got[:3]
    assert state.num_registered == 2  # full blocks before position 9 (the last known token)
    p.cache.check_integrity()


def test_the_cache_follows_the_accepted_tokens(draft, greedy):
    p = _proposer(draft)
    prompt = [5, 9, 17, 3, 88, 41, 7, 120, 33, 2]
    first = _one(p, 1, prompt, 4)
    # the target accepts two drafts, then emits its own token: only position 12 is recomputed
    tokens = prompt + first[:2] + [300]
    second = _one(p, 1, tokens, 3)
    assert second == greedy(tokens, 3)
    state = p.cache._seqs[1]
    assert state.held == tokens + second[:2]
    assert state.block_table == [0, 1, 2, 3]  # positions 0..14
    assert state.num_registered == 3
    # all four accepted, plus a bonus token: nothing is recomputed but the bonus position
    tokens = tokens + second + [17]
    assert _one(p, 1, tokens, 2) == greedy(tokens, 2)
    assert p.cache._seqs[1].block_table == [0, 1, 2, 3, 4]
    p.cache.check_integrity()
    p.release(1)
    assert p.cache.blocks.num_free_blocks == 32


def test_batched_sequences_share_cached_prompt_blocks(draft, greedy):
    p = _proposer(draft)
    a = [5, 9, 17, 3, 88, 41, 7, 120, 33, 2]
    b = [5, 9, 17, 3, 88, 41, 7, 120, 99, 1, 4]
    got_a = p.propose(DraftBatch([DraftRequest(1, a, 3)])).token_ids[0]
    got = p.propose(DraftBatch([DraftRequest(2, b, 2), DraftRequest(1, a + got_a[:1] + [6], 3),
                                DraftRequest(3, [8, 8], 0)])).token_ids
    assert got[0] == greedy(b, 2)
    assert got[1] == greedy(a + got_a[:1] + [6], 3)
    assert got[2] == []
    assert p.cache._seqs[2].block_table[:2] == p.cache._seqs[1].block_table[:2]  # a's first 8 tokens
    assert p.cache.blocks.prefix_hits == 2
    p.cache.check_integrity()


def test_sampled_drafts_carry_their_distribution(draft):
    p = _proposer(draft)
    prompt = [5, 9, 17, 3, 88, 41]
    reqs = [DraftRequest(1, prompt, 3, temperature=0.8, key=3), DraftRequest(2, prompt[:4], 1)]
    prop = p.propose(DraftBatch(reqs))
    again = _proposer(draft).propose(DraftBatch(reqs))
    assert prop.token_ids == again.token_ids
    q = prop.draft_probs
    assert q.shape == (4, 320) and torch.allclose(q.sum(dim=1), torch.ones(4))
    assert all(q[j, t] > 0 for j, t in enumerate(prop.token_ids[0]))
    assert q[3, prop.token_ids[1][0]] == 1.0  # the greedy request's row is one-hot


def test_out_of_blocks_proposes_nothing(draft):
    p = _proposer(draft, num_blocks=2)
    assert _one(p, 1, list(range(3, 20)), 3) == []
    p.cache.check_integrity()
    assert p.cache.blocks.num_free_blocks == 2


def test_bytes_per_block_counts_every_layer(draft):
    model, _ = draft
    # 2 layers x (K + V) x 2 kv heads x 4 tokens x head_dim 16 x 4 bytes
    assert DraftModelProposer.bytes_per_block(model, 4) == 2 * 2 * 2 * 4 * 16 * 4


def test_one_budget_gives_both_caches_the_same_blocks():
    from gpu_engine.spec.draft_cache import blocks_for_budget

    assert blocks_for_budget(10_000, 300, 100) == 25  # 25 * (300 + 100) <= 10_000
    assert blocks_for_budget(10_000, 300, 0) == 33
    with pytest.raises(ValueError, match="bytes per block must be positive"):
        blocks_for_budget(10_000, 0, 100)
