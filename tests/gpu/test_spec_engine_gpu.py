"""Speculative decoding in the engine's step loop on a GPU (Triton kernels, CUDA graphs for the
plain decode steps, the overlapped loop above the batch-size threshold): float32 greedy output
equals the CPU engine's without speculation, for every method; sampled speculation runs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from taxiway import LLM, SamplingParams
from tests.engine.hf import random_prompts
from tests.engine.spec_helpers import ALWAYS, generate_checked, random_head, tokens_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 9, 17, 3, 88, 41, 7, 120] * 4, [200, 201, 202] * 8] + random_prompts(6, 320, seed=3)


@pytest.fixture(scope="module")
def cpu_reference(tiny_llama):
    return tokens_of(LLM(tiny_llama, device="cpu", num_kv_blocks=256, max_model_len=512).generate(PROMPTS, GREEDY))


def _spec(tiny_llama, tmp_path_factory, method):
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    if method == "draft_model":
        return {"method": "draft_model", "num_speculative_tokens": 4, "model": tiny_llama}
    return {"method": "eagle3", "num_speculative_tokens": 3,
            "model": random_head(tiny_llama, tmp_path_factory.mktemp("eagle"))}


@pytest.mark.parametrize("method", ["ngram", "draft_model", "eagle3"])
@pytest.mark.parametrize("threshold", [32, 3])  # 3: the first steps run overlapped, without drafts
def test_float32_greedy_with_speculation_equals_cpu(method, threshold, tiny_llama, tmp_path_factory, cpu_reference):
    spec = {**_spec(tiny_llama, tmp_path_factory, method), "disable_above_batch_size": threshold}
    llm = LLM(tiny_llama, device="cuda", dtype="float32", num_kv_blocks=256, max_model_len=512,
              speculative_config=spec)
    assert llm.engine.async_scheduling
    # different lengths: the batch shrinks below a low threshold, and drafting starts part way
    lengths = [GREEDY.max_tokens - 3 * i for i in range(len(PROMPTS))]
    outs = generate_checked(llm, PROMPTS, [replace(GREEDY, max_tokens=n) for n in lengths])
    assert tokens_of(outs) == [ref[:n] for ref, n in zip(cpu_reference, lengths)]
    stats = llm.engine.scheduler.spec_stats
    assert stats.num_draft_tokens > 0
    chain = getattr(llm.engine.spec.proposer, "chain", None)
    if method != "ngram":  # the drafters' greedy chains replayed their CUDA graphs
        assert sorted(chain.graphs) == chain.sizes and chain.replays > 0
    if method == "draft_model":  # the target as its own draft (decode vs verify kernels may differ a hair)
        assert stats.num_accepted_tokens >= 0.9 * stats.num_draft_tokens


def test_sampled_speculation_in_bfloat16_runs_and_is_reproducible(tiny_llama):
    # The gate is pinned (ALWAYS): a draft model at temperature > 0 drafts from a distribution q,
    # and a step that verifies such drafts draws its tokens from other streams (draft, accept,
    # residual) than a plain step does, so a seeded request reproduces only when the same steps
    # speculate (docs/engine.md, "The gate"). The gated default decides that from measured step
    # times and keeps its state for the engine's life: ungated, the second generate on this engine
    # differed from the first at prompt 0's second token (the same tokens on the CPU, where the
    # second generate began in the plain-loop probe the first one left running).
    spec = {"method": "draft_model", "num_speculative_tokens": 3, "model": tiny_llama, **ALWAYS}
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True,
                            repetition_penalty=1.1, logprobs=2)
    llm = LLM(tiny_llama, device="cuda", num_kv_blocks=256, max_model_len=512, speculative_config=spec)
    a = generate_checked(llm, PROMPTS, params)
    b = generate_checked(llm, PROMPTS, params)
    assert tokens_of(a) == tokens_of(b)
    assert all(len(o.outputs[0].token_ids) == 24 and len(o.outputs[0].logprobs) == 24 for o in a)
    assert llm.engine.scheduler.spec_stats.num_accepted_tokens > 0


def test_captured_draft_chains_draft_as_the_eager_chain(tiny_llama, tmp_path):
    """The CUDA graphs of the drafters' chains (gpu_engine/spec/chain_graphs.py) against their eager
    chains, in float32: padded rows, rows wanting fewer drafts, a head cache starting at 2."""
    from gpu_engine.spec.draft_model import DraftModelProposer, load_draft_model
    from gpu_engine.spec.eagle3 import load_eagle3_head
    from gpu_engine.spec.eagle3_proposer import Eagle3Proposer
    from gpu_engine.spec.proposer import DraftBatch, DraftRequest
    from tests.engine.spec_helpers import features, load_target
    from tests.engine.test_spec_chain_graphs import same_proposals

    dev = torch.device("cuda")
    model, cfg = load_target(tiny_llama)
    draft = load_draft_model(tiny_llama, cfg, torch.float32, dev)
    made = [DraftModelProposer(draft, 64, 16, 512, dev, cfg.vocab_size) for _ in range(2)]
    assert made[1].build_chain(max_rows=4, steps=4, capture=True) > 0
    a, b = PROMPTS[0][:20], [(7 * i + 3) % 300 + 3 for i in range(30)]
    first = same_proposals(*made, DraftBatch([DraftRequest(1, a, 4), DraftRequest(2, b, 2),
                                              DraftRequest(3, [8, 8, 6], 3)]), atol=1e-4)
    same_proposals(*made, DraftBatch([DraftRequest(2, b + first[1], 4), DraftRequest(1, a + first[0][:1] + [6], 3)]),
                   atol=1e-4)
    assert made[1].chain.replays == 2

    head = load_eagle3_head(random_head(tiny_llama, tmp_path / "head"), cfg, torch.float32, dev)
    (fa, _), (fb, _) = features(model, [a, b], head.cfg.aux_layers)
    made = [Eagle3Proposer(head, model.embed_tokens.to(dev), 64, 16, 512, dev) for _ in range(2)]
    made[1].build_chain(max_rows=4, steps=4, capture=True)
    rows = torch.cat([fa[:19], fb[2:29]]).to(dev)
    same_proposals(*made, DraftBatch([DraftRequest(1, a, 4, hidden_rows=(0, 0, 19)),
                                      DraftRequest(2, b, 1, hidden_rows=(19, 2, 27))], rows), atol=1e-4)
    assert made[1].chain.replays == 1
