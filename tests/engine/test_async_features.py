"""No feature forces a synchronous step any more: penalties, min_tokens bans, n > 1, prompt
logprobs and top-N logprobs give the same results with the overlapped loop as without it, and
after preemption (the Sampler's slot state is rebuilt from the host's tokens)."""

import pytest

from taxiway import LLM, SamplingParams
from tests.engine.hf import random_prompts

PROMPTS = random_prompts(6, 320, seed=17, lengths=[5, 9, 14, 20, 27, 33])
PARAMS = [
    SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=0.9, frequency_penalty=0.7, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=11, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=0.0, prompt_logprobs=2, logprobs=3, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=0.8, min_tokens=6, stop_token_ids=(7, 9), seed=5),
    SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
]


def results(llm):
    outs = llm.generate(PROMPTS, PARAMS)
    llm.engine.block_manager.check_integrity()
    return [([c.token_ids for c in o.outputs], [c.logprobs for c in o.outputs], o.prompt_logprobs) for o in outs]


@pytest.fixture(scope="module")
def sync(tiny_llama):
    return results(LLM(tiny_llama, num_kv_blocks=256, max_model_len=128, async_scheduling=False))


def test_the_overlapped_loop_keeps_overlapping_and_changes_nothing(tiny_llama, sync):
    llm = LLM(tiny_llama, num_kv_blocks=256, max_model_len=128, async_scheduling=True)
    overlapped = []
    step = llm.engine.step

    def watched():
        out = step()
        overlapped.append(llm.engine._inflight is not None)
        return out

    llm.engine.step = watched
    assert results(llm) == sync
    assert all(overlapped[:-1])  # every step but the last left one in flight


@pytest.mark.parametrize("overlap", [False, True])
def test_preemption_rebuilds_the_sampling_state(tiny_llama, sync, overlap):
    llm = LLM(tiny_llama, num_kv_blocks=9, max_model_len=128, max_num_batched_tokens=24,
              async_scheduling=overlap)
    got = results(llm)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [g[0] for g in got] == [s[0] for s in sync]
