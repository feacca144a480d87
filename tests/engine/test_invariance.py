"""Chunked prefill, preemption with recompute, prefix-cache hits and n > 1 change no greedy output;
a seeded request samples the same tokens whatever else runs beside it."""

import pytest

from taxiway import LLM, SamplingParams
from tests.engine.hf import random_prompts

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = random_prompts(10, 320, seed=42, lengths=[3, 8, 15, 16, 17, 30, 47, 64, 90, 120])


def greedy_tokens(llm, prompts=PROMPTS, params=GREEDY):
    outs = llm.generate(prompts, params)
    llm.engine.block_manager.check_integrity()
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def baseline(tiny_llama):
    llm = LLM(tiny_llama, num_kv_blocks=256, max_model_len=512, enable_prefix_caching=False)
    return greedy_tokens(llm)


def test_chunked_prefill_changes_nothing(tiny_llama, baseline):
    llm = LLM(tiny_llama, num_kv_blocks=256, max_model_len=512, max_num_batched_tokens=7)
    assert greedy_tokens(llm) == baseline


def test_preemption_with_recompute_changes_nothing(tiny_llama, baseline):
    llm = LLM(tiny_llama, num_kv_blocks=12, max_model_len=192, max_num_batched_tokens=64)
    assert greedy_tokens(llm) == baseline
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.stats().num_free_blocks == 12


def test_guaranteed_no_evict_changes_nothing_and_never_preempts(tiny_llama, baseline):
    llm = LLM(tiny_llama, num_kv_blocks=24, max_model_len=256, admission_policy="guaranteed_no_evict")
    assert greedy_tokens(llm) == baseline
    assert llm.engine.scheduler.num_preemptions == 0


def test_tail_overcommit_admits_the_last_requests_and_changes_nothing(tiny_llama, baseline):
    """The prompts need 37 blocks to finish and the pool holds 34: under guaranteed_no_evict the
    last ones wait; with 10% of tail overcommit all run from the first step, and the outputs stay
    the same whether or not the pool then runs out."""
    def first_step_running(overcommit):
        llm = LLM(tiny_llama, num_kv_blocks=34, max_model_len=256, admission_policy="guaranteed_no_evict",
                  admission_tail_overcommit=overcommit)
        for i, p in enumerate(PROMPTS):
            llm.engine.add_request(str(i), p, GREEDY)
        llm.engine.step()
        running = len(llm.engine.scheduler.running)
        llm.engine.abort_request([str(i) for i in range(len(PROMPTS))])
        return running

    assert first_step_running(0.0) < len(PROMPTS) == first_step_running(0.1)
    llm = LLM(tiny_llama, num_kv_blocks=34, max_model_len=256, admission_policy="guaranteed_no_evict",
              admission_tail_overcommit=0.1)
    assert greedy_tokens(llm) == baseline


@pytest.mark.parametrize("block_size", [8, 32])
def test_other_block_sizes_change_nothing(tiny_llama, baseline, block_size):
    llm = LLM(tiny_llama, num_kv_blocks=4096 // block_size, max_model_len=512, block_size=block_size)
    assert greedy_tokens(llm) == baseline


def test_prefix_cache_hits_change_nothing(tiny_llama, baseline):
    llm = LLM(tiny_llama, num_kv_blocks=256, max_model_len=512)
    shared = PROMPTS[-1][:64]
    prompts = [shared + p for p in PROMPTS[:4]]
    cold = LLM(tiny_llama, num_kv_blocks=256, max_model_len=512, enable_prefix_caching=False)
    want = greedy_tokens(cold, prompts)
    first = greedy_tokens(llm, prompts[:1])
    rest = greedy_tokens(llm, prompts[1:])
    assert first + rest == want
    assert llm.engine.stats().prefix_cache_hits >= 3 * 4  # each later prompt reuses 4 shared blocks
    outs = llm.generate(prompts[1], GREEDY)
    assert outs[0].num_cached_tokens == 64


def test_n_samples_share_the_prompt_and_greedy_samples_agree(tiny_llama, baseline):
    llm = LLM(tiny_llama, num_kv_blocks=256, max_model_len=512)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, n=3)
    outs = llm.generate(PROMPTS, params)
    for out, want in zip(outs, baseline):
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(c.token_ids == want for c in out.outputs)
    assert llm.engine.stats().num_free_blocks == 256


def test_seeded_sampling_is_reproducible_inside_mixed_batches(tiny_llama):
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True, n=2)
    prompt = PROMPTS[5]
    alone = LLM(tiny_llama, num_kv_blocks=256, max_model_len=512).generate(prompt, seeded)[0]
    crowded_llm = LLM(tiny_llama, num_kv_blocks=14, max_model_len=192, max_num_batched_tokens=20)
    others = [SamplingParams(max_tokens=16, temperature=0.8, ignore_eos=True)] * 6
    batch = PROMPTS[:3] + [prompt] + PROMPTS[6:9]
    outs = crowded_llm.generate(batch, others[:3] + [seeded] + others[3:])
    assert crowded_llm.engine.scheduler.num_preemptions > 0
    assert [c.token_ids for c in outs[3].outputs] == [c.token_ids for c in alone.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids  # the two samples differ


def test_unseeded_sampling_differs_between_requests(tiny_llama):
    llm = LLM(tiny_llama, num_kv_blocks=256, max_model_len=512)
    params = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    outs = llm.generate([PROMPTS[4]] * 4, params)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) > 1


@pytest.mark.parametrize("pool, budget", [(256, 8192), (12, 64)])
def test_async_scheduling_changes_nothing(tiny_llama, baseline, pool, budget):
    """The overlapped loop (tokens of step N fed to step N+1 on the device) on the CPU."""
    llm = LLM(tiny_llama, num_kv_blocks=pool, max_model_len=192, max_num_batched_tokens=budget,
              async_scheduling=True)
    assert greedy_tokens(llm) == baseline
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    sync = LLM(tiny_llama, num_kv_blocks=256, max_model_len=192, async_scheduling=False)
    assert greedy_tokens(llm, params=seeded) == greedy_tokens(sync, params=seeded)
    assert llm.engine.stats().num_free_blocks == pool
