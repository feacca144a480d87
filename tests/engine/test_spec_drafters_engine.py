"""Draft-model and EAGLE-3 speculation inside the engine's step loop: greedy output token-identical
to no speculation (the target as its own draft accepts everything, a random draft almost nothing,
a random EAGLE-3 head), with chunked prefill, preemption, prefix hits and penalties; the drafters'
caches follow the accepted tokens; a chi-square test that sampled speculation keeps the target's
distribution."""

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from gpu_engine.quant.awq_method import AwqLinear
from gpu_engine.quant.fp8 import Fp8Linear
from taxiway import LLM, SamplingParams
from tests.engine.hf import random_prompts
from tests.engine.spec_helpers import ALWAYS, generate_checked, tokens_of

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
DATA = Path(__file__).resolve().parent.parent / "data"
QUANTIZED = {"tiny-llama-fp8-dynamic": Fp8Linear, "tiny-llama-autoawq": AwqLinear}  # written by llm-compressor, AutoAWQ
PROMPTS = random_prompts(5, 320, seed=11, lengths=[4, 13, 16, 29, 50])


def spec_llm(path, method, model, k=3, **kw):
    kw.setdefault("num_kv_blocks", 128)
    kw.setdefault("max_model_len", 256)
    return LLM(path, speculative_config={"method": method, "num_speculative_tokens": k, "model": model, **ALWAYS},
               **kw)


@pytest.fixture(scope="module")
def baseline(tiny_llama):
    return tokens_of(LLM(tiny_llama, num_kv_blocks=128, max_model_len=256).generate(PROMPTS, GREEDY))


def test_the_target_as_its_own_draft_accepts_every_draft(tiny_llama, baseline):
    llm = spec_llm(tiny_llama, "draft_model", tiny_llama)
    outs = generate_checked(llm, PROMPTS, GREEDY)
    assert tokens_of(outs) == baseline
    assert all(o.num_draft_tokens > 0 and o.num_accepted_tokens == o.num_draft_tokens for o in outs)
    drafter = llm.engine.spec.proposer.cache
    drafter.check_integrity()
    assert drafter.blocks.num_free_blocks == drafter.blocks.num_blocks  # released with their requests
    alone = [tokens_of(generate_checked(llm, [p], GREEDY))[0] for p in PROMPTS[:2]]
    assert alone == baseline[:2]


def test_a_random_draft_accepts_almost_nothing_and_changes_nothing(tiny_llama, tiny_checkpoints, baseline):
    llm = spec_llm(tiny_llama, "draft_model", tiny_checkpoints["qwen2"])
    outs = generate_checked(llm, PROMPTS, GREEDY)
    assert tokens_of(outs) == baseline
    stats = llm.engine.scheduler.spec_stats
    assert stats.num_draft_tokens > 50 and stats.num_accepted_tokens / stats.num_draft_tokens < 0.2


@pytest.mark.parametrize("name", sorted(QUANTIZED))
def test_a_quantized_draft_model_is_served_as_published(tiny_llama, baseline, name):
    llm = spec_llm(tiny_llama, "draft_model", str(DATA / name))
    draft = llm.engine.spec.proposer.model
    assert isinstance(draft.layers[0].qkv_proj, QUANTIZED[name])  # not dequantized to 16 bits
    outs = generate_checked(llm, PROMPTS, GREEDY)
    assert tokens_of(outs) == baseline
    assert llm.engine.scheduler.spec_stats.num_draft_tokens > 0


def test_a_quantized_target_as_its_own_draft_accepts_every_draft():
    folder = str(DATA / "tiny-llama-fp8-dynamic")
    want = tokens_of(LLM(folder, num_kv_blocks=128, max_model_len=256).generate(PROMPTS, GREEDY))
    outs = generate_checked(spec_llm(folder, "draft_model", folder), PROMPTS, GREEDY)
    assert tokens_of(outs) == want
    assert all(o.num_draft_tokens > 0 and o.num_accepted_tokens == o.num_draft_tokens for o in outs)


@pytest.mark.parametrize("setting", [
    {"max_num_batched_tokens": 9},
    {"num_kv_blocks": 10, "max_model_len": 128, "max_num_batched_tokens": 64},
])
def test_chunked_prefill_and_preemption_with_a_draft_model(tiny_llama, baseline, setting):
    llm = spec_llm(tiny_llama, "draft_model", tiny_llama, **setting)
    assert tokens_of(generate_checked(llm, PROMPTS, GREEDY)) == baseline
    if "num_kv_blocks" in setting:
        assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_hits_and_penalties_with_a_draft_model(tiny_llama):
    shared = PROMPTS[-1][:32]
    prompts = [shared + p for p in PROMPTS[:3]]
    params = [GREEDY, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, repetition_penalty=1.2,
                                     frequency_penalty=0.5, presence_penalty=0.3, min_tokens=4), GREEDY]
    want = tokens_of(LLM(tiny_llama, num_kv_blocks=128, max_model_len=256).generate(prompts, params))
    llm = spec_llm(tiny_llama, "draft_model", tiny_llama, k=4)
    got = tokens_of(generate_checked(llm, prompts[:1], params[:1])) + tokens_of(
        generate_checked(llm, prompts[1:], params[1:]))
    assert got == want
    assert llm.engine.stats().prefix_cache_hits >= 2 * 2
    # penalties make the target leave the draft's greedy path: drafts are rejected, output unchanged
    stats = llm.engine.scheduler.spec_stats
    assert stats.num_accepted_tokens < stats.num_draft_tokens


def test_eagle3_with_a_random_head_changes_nothing(tiny_llama, eagle_head, baseline):
    llm = spec_llm(tiny_llama, "eagle3", eagle_head)
    outs = generate_checked(llm, PROMPTS, GREEDY)
    assert tokens_of(outs) == baseline
    assert all(o.num_draft_tokens > 0 for o in outs)
    alone = [tokens_of(generate_checked(llm, [p], GREEDY))[0] for p in PROMPTS[:2]]
    assert alone == baseline[:2]
    for setting in ({"max_num_batched_tokens": 9},
                    {"num_kv_blocks": 10, "max_model_len": 128, "max_num_batched_tokens": 64}):
        other = spec_llm(tiny_llama, "eagle3", eagle_head, **setting)
        assert tokens_of(generate_checked(other, PROMPTS, GREEDY)) == baseline
    assert other.engine.scheduler.num_preemptions > 0
    shared = [PROMPTS[-1][:32] + p for p in PROMPTS[:2]]  # prefix hits: the head restarts past them
    want = tokens_of(LLM(tiny_llama, num_kv_blocks=128, max_model_len=256).generate(shared, GREEDY))
    assert tokens_of(generate_checked(llm, shared[:1], GREEDY) + generate_checked(llm, shared[1:], GREEDY)) == want
    cache = llm.engine.spec.proposer.cache
    cache.check_integrity()
    assert cache.blocks.num_free_blocks == cache.blocks.num_blocks


def test_sampled_speculation_keeps_the_target_distribution(tiny_llama, tiny_checkpoints):
    """The second output token is verified (drawn by rejection sampling against a random draft's q,
    or as the bonus); over 600 seeds its distribution matches plain sampling (chi-square)."""
    prompt = PROMPTS[1]
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=4, seed=s, ignore_eos=True) for s in range(600)]
    plain = LLM(tiny_llama, num_kv_blocks=512, max_model_len=64, max_num_seqs=600).generate([prompt] * 600, params)
    llm = LLM(tiny_llama, num_kv_blocks=512, max_model_len=64, max_num_seqs=600, speculative_config={
        "method": "draft_model", "num_speculative_tokens": 2, "model": tiny_checkpoints["qwen2"],
        "disable_above_batch_size": 600, **ALWAYS})
    spec = llm.generate([prompt] * 600, [SamplingParams(**{**p.__dict__, "seed": p.seed + 10_000}) for p in params])
    assert sum(o.num_draft_tokens for o in spec) >= 600  # every request verified drafts
    for pos in (1, 2):
        a = [o.outputs[0].token_ids[pos] for o in plain]
        b = [o.outputs[0].token_ids[pos] for o in spec]
        cats = sorted(set(a) | set(b))
        table = np.array([[a.count(c) for c in cats], [b.count(c) for c in cats]])
        table = table[:, table.sum(axis=0) >= 5]  # the chi-square approximation needs counts
        assert chi2_contingency(table)[1] > 0.001, (pos, table)


def test_seeded_sampled_speculation_in_bfloat16_is_reproducible(tiny_llama):
    """The GPU test's body on the CPU: with every step speculating (the gate pinned), a seeded
    request drawing drafts from the draft's q emits the same tokens on a second generate (prefix
    hits in the target's and the draft's caches, new sequence ids), and whatever else is batched
    (the prompts reversed, a prompt alone on a fresh engine): the draft, acceptance and residual
    draws are keyed by (seed, sample index, position), not by batch row, step or other requests.
    With the gate measuring (the default), which steps speculate depends on step times and on what
    earlier requests left in the gate, and so do these draws (docs/engine.md, "The gate")."""
    prompts = [[5, 9, 17, 3, 88, 41, 7, 120] * 4, [200, 201, 202] * 8] + random_prompts(6, 320, seed=3)
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True,
                            repetition_penalty=1.1, logprobs=2)

    def engine():
        return spec_llm(tiny_llama, "draft_model", tiny_llama, dtype="bfloat16", num_kv_blocks=256, max_model_len=512)

    llm = engine()
    first = tokens_of(generate_checked(llm, prompts, params))
    assert tokens_of(generate_checked(llm, prompts, params)) == first
    assert llm.engine.scheduler.spec_stats.num_accepted_tokens > 0
    assert tokens_of(generate_checked(engine(), prompts[::-1], params))[::-1] == first
    assert tokens_of(generate_checked(engine(), prompts[:1], params)) == first[:1]
