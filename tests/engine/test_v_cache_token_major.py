"""v_cache_token_major: V stored with each block's tokens contiguous per dimension, seen through a
transposed view. Greedy tokens and prompt logprobs equal the row-major cache's through the torch
reference ops, in the model's dtype and FP8, with chunked prefill, a prefix-cache hit and n = 2 (a
block copy); tests/kernels/test_v_cache_token_major_engine.py runs the same through the kernels."""

import pytest

from taxiway import LLM, SamplingParams

PROMPTS = [list(range(3, 3 + n)) for n in (5, 16, 17, 40)] + [list(range(3, 43)) + [7, 9]]  # the last shares 40


def _run(model, token_major: bool, kv: str, device: str = "cpu", **kw):
    llm = LLM(model, device=device, num_kv_blocks=64, block_size=16, kv_cache_dtype=kv,
              v_cache_token_major=token_major, max_num_batched_tokens=24, **kw)
    k, v = llm.engine.runner.kv_caches[0]
    assert k.stride(-1) == 1 and (v.stride(-2) == 1) == token_major
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=0))
    forked = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=5, temperature=0.0, n=2))  # 17 tokens: a partial block to copy
    return ([o.outputs[0].token_ids for o in greedy], [o.prompt_logprobs for o in greedy],
            [c.token_ids for c in forked[0].outputs])


def _close_logprobs(a, b, tol):
    for pa, pb in zip(a, b):
        for ea, eb in zip(pa, pb):
            if ea is None or eb is None:
                assert ea is eb
                continue
            assert ea.keys() == eb.keys()
            assert all(abs(ea[t] - eb[t]) <= tol for t in ea)  # token -> logprob


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_same_outputs_through_the_reference_ops(tiny_llama, kv):
    row, tm = _run(tiny_llama, False, kv), _run(tiny_llama, True, kv)
    assert tm[0] == row[0] and tm[2] == row[2]
    _close_logprobs(tm[1], row[1], 1e-5)
