"""Tensor parallelism on GPUs: tensor_parallel_size 1 runs the sharded code path (slice reads,
no-op collectives) with the CPU reference's tokens; 2 GPUs over NCCL give tp=1's tokens."""

import os

import pytest
import torch

from taxiway import LLM, SamplingParams
from tests.engine.hf import random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
PROMPTS = random_prompts(8, 320, seed=5, lengths=[1, 7, 16, 17, 33, 65, 130, 200])
SETTINGS = dict(dtype="float32", num_kv_blocks=256, max_model_len=512, max_num_seqs=32)


def tokens_and_logprobs(llm):
    outs = [o.outputs[0] for o in llm.generate(PROMPTS, GREEDY)]
    llm.engine.block_manager.check_integrity()
    return [o.token_ids for o in outs], [[lp[t] for lp, t in zip(o.logprobs, o.token_ids)] for o in outs]


def close(a, b, tol):
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)) < tol


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tp1_through_the_sharded_path_equals_the_cpu_reference(arch, tiny_checkpoints):
    want = tokens_and_logprobs(LLM(tiny_checkpoints[arch], device="cpu", **SETTINGS))
    llm = LLM(tiny_checkpoints[arch], device="cuda", tensor_parallel_size=1, **SETTINGS)
    assert llm.engine.driver is None and llm.engine.runner.graphs is not None
    assert llm.engine.runner.num_kv_heads == llm.engine.model_config.num_kv_heads
    got = tokens_and_logprobs(llm)
    assert got[0] == want[0] and close(got[1], want[1], 2e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tp2_over_nccl_equals_tp1(arch, tiny_checkpoints):
    want = tokens_and_logprobs(LLM(tiny_checkpoints[arch], device="cuda", **SETTINGS))
    llm = LLM(tiny_checkpoints[arch], device="cuda", tensor_parallel_size=2, **SETTINGS)
    try:
        assert os.environ["NCCL_NVLS_ENABLE"] == "0"
        assert llm.engine.runner.num_kv_heads == 1 and llm.engine.device == torch.device("cuda", 0)
        assert llm.engine.async_scheduling, "the GPU default: the overlapped step loop"
        overlapped = tokens_and_logprobs(llm)
        llm.engine.async_scheduling = False
        synchronous = tokens_and_logprobs(llm)
    finally:
        llm.engine.shutdown()
    for got in (overlapped, synchronous):
        assert got[0] == want[0] and close(got[1], want[1], 1e-3)
