"""The start-up warm-up's shapes (gpu_engine/runner.py): which token counts it runs, and that a
forward through the allocated cache, its blocks reused, changes nothing a request then gets.

On a GPU the warm-up compiles what eager steps need (tests/gpu/test_gpu_compile_watch.py checks
that nothing is compiled later); here it runs the same forwards through the torch ops.
"""

import pytest

from gpu_engine.runner import warmup_token_counts
from taxiway import LLM, SamplingParams
from tests.engine.hf import random_prompts


@pytest.mark.parametrize("max_tokens", [1, 2, 16, 40, 511, 8192])
def test_the_counts_meet_every_power_of_two_bucket_on_both_sides_of_16(max_tokens):
    counts = warmup_token_counts(max_tokens)
    assert counts == sorted(set(counts)) and counts[0] == 1 and counts[-1] == max_tokens
    kinds = {(max(c - 1, 0).bit_length(), c == 1, c % 16 == 0) for c in counts}
    for n in range(1, max_tokens + 1):  # each count a step can have: a warm-up count of its kind
        bucket = max(n - 1, 0).bit_length()  # next power of two = 2 ** bucket
        assert (bucket, n == 1, n % 16 == 0) in kinds, (n, counts)


def test_a_warm_up_forward_through_the_allocated_cache_changes_no_output(tiny_llama):
    """1,000 tokens through an 8-block cache (each block reused many times), then requests:
    the same tokens as an engine that never ran it."""
    prompts = random_prompts(4, 320, seed=2, lengths=[3, 40, 17, 90])
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    settings = {"device": "cpu", "num_kv_blocks": 24, "max_model_len": 128, "max_num_batched_tokens": 1000}
    want = [o.outputs[0].token_ids for o in LLM(tiny_llama, **settings).generate(prompts, params)]
    llm = LLM(tiny_llama, **settings)
    assert llm.engine.warm_up_s == 0.0  # the CPU compiles nothing: start-up skips it
    llm.engine.runner._warmup_forward(1000, num_blocks=8)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
