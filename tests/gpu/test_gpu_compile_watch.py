"""No Triton kernel is specialised after the engine's start-up, whatever the batches' shapes.

A specialisation while serving stalls every running sequence (seconds on a cold Triton cache). The
workload mixes what a served stream sees: chunked prefills beside an odd number of decodes (the
metadata views start at any offset), prompts of 1 token and of many blocks, prefix hits, greedy and
sampled requests with penalties. The engine's compile watch (taxiway_kernels/compile_watch.py) records
each specialisation; none may come after its start-up mark.
"""

import pytest
import torch

from taxiway import LLM, SamplingParams
from tests.engine.hf import random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = random_prompts(13, 320, seed=11, lengths=[1, 3, 16, 17, 31, 47, 64, 65, 99, 128, 150, 2, 9])


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_no_kernel_is_specialised_after_start_up(tiny_llama, kv_cache_dtype):
    llm = LLM(tiny_llama, device="cuda", dtype="bfloat16", num_kv_blocks=128, max_model_len=512, max_num_seqs=16,
              max_num_batched_tokens=40, kv_cache_dtype=kv_cache_dtype)
    watch = llm.engine.compile_watch
    assert watch.enabled and watch.summary()["at_start"] > 0, watch.summary()
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, top_k=40, seed=5, ignore_eos=True,
                             repetition_penalty=1.1, presence_penalty=0.2)
    llm.generate(PROMPTS, greedy)
    llm.generate(PROMPTS[::2], sampled)
    llm.generate(PROMPTS[1::2] + PROMPTS[:3], greedy)  # prefix hits beside fresh prompts
    late = watch.summary()
    assert llm.engine.stats().kernel_compiles_late == 0, late
