"""The persistent batch on a GPU: decode graphs reading the device buffers up to 4096 sequences,
the overlapped loop feeding decodes from the device through admissions and slot reuse, and the
step timings' GPU figures."""

import pytest
import torch

from taxiway import LLM, SamplingParams
from tests.engine.hf import random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def tokens(llm, prompts, params):
    outs = llm.generate(prompts, params)
    llm.engine.block_manager.check_integrity()
    return [o.outputs[0].token_ids for o in outs]


def test_graphs_up_to_4096_sequences_give_the_eager_tokens(tiny_llama):
    prompts = random_prompts(4096, 320, seed=11, lengths=[3 + i % 29 for i in range(4096)])
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    kw = dict(device="cuda", dtype="float32", num_kv_blocks=4096 * 4, max_model_len=64, max_num_seqs=4096,
              enable_prefix_caching=False)
    graphed = LLM(tiny_llama, **kw)
    assert graphed.engine.runner.graphs.sizes[-1] == 4096
    got = tokens(graphed, prompts, params)
    decode = graphed.engine.step_times.summary()["decode"]
    assert decode["mean_seqs"] > 2048 and decode["gpu_ms"] > 0 and "gpu_idle_ms" in decode
    want = tokens(LLM(tiny_llama, enforce_eager=True, **kw), prompts, params)
    assert got == want


@pytest.mark.parametrize("overlap", [True, False])
def test_decodes_fed_from_the_device_survive_admissions_and_slot_reuse(tiny_llama, overlap):
    """More requests than slots, ragged lengths: slots are freed and reused every few steps."""
    prompts = random_prompts(64, 320, seed=5, lengths=[2 + (7 * i) % 61 for i in range(64)])
    params = [SamplingParams(max_tokens=3 + i % 13, temperature=0.0, ignore_eos=True) for i in range(64)]
    cpu = LLM(tiny_llama, device="cpu", num_kv_blocks=512, max_model_len=128)
    want = [o.outputs[0].token_ids for o in cpu.generate(prompts, params)]
    llm = LLM(tiny_llama, device="cuda", dtype="float32", num_kv_blocks=512, max_model_len=128, max_num_seqs=24,
              max_num_batched_tokens=96, async_scheduling=overlap)
    assert tokens(llm, prompts, params) == want
    assert llm.engine.scheduler.batch.num_occupied == 0


def test_seeded_sampling_under_graphs_matches_the_cpu(tiny_llama):
    prompts = random_prompts(12, 320, seed=9, lengths=[4 + 5 * i for i in range(12)])
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=40, top_p=0.95, seed=21, ignore_eos=True)
    want = tokens(LLM(tiny_llama, device="cpu", num_kv_blocks=256, max_model_len=128), prompts, params)
    got = tokens(LLM(tiny_llama, device="cuda", dtype="float32", num_kv_blocks=256, max_model_len=128), prompts, params)
    assert sum(g == w for g, w in zip(got, want)) >= len(want) - 1  # float32 on both: at most a near-tie differs


def test_sampler_features_in_the_overlapped_loop_match_the_synchronous_one(tiny_llama):
    """Penalties, bans, n > 1, prompt and top-N logprobs through the device Sampler: no sync step."""
    from tests.engine.test_async_features import PARAMS, results

    kw = dict(device="cuda", dtype="float32", num_kv_blocks=256, max_model_len=128)
    sync = results(LLM(tiny_llama, async_scheduling=False, **kw))
    overlapped = results(LLM(tiny_llama, async_scheduling=True, **kw))
    assert [o[0] for o in overlapped] == [s[0] for s in sync]
    cpu = results(LLM(tiny_llama, device="cpu", num_kv_blocks=256, max_model_len=128))
    greedy = [i for i, p in enumerate(PARAMS) if p.temperature == 0]
    assert sum(overlapped[i][0] == cpu[i][0] for i in greedy) >= len(greedy) - 1
