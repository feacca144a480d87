"""FP8 W8A8 + FP8 KV cache on a GPU (sm_89+): Triton kernels, torch._scaled_mm and CUDA graphs,
against BF16 on the GPU and against the CPU reference engine with the same quantization."""

from pathlib import Path

import pytest
import torch

from taxiway import LLM, SamplingParams
from tests.engine.hf import random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DATA = Path(__file__).resolve().parent.parent / "data"
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
PROMPTS = random_prompts(16, 320, seed=5, lengths=[1, 2, 7, 15, 16, 17, 33, 64, 65, 100, 130, 200, 5, 9, 40, 80])
FP8 = dict(quantization="fp8", kv_cache_dtype="fp8")


@pytest.fixture(autouse=True)
def _needs_sm89():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need sm_89+")


def run(llm, prompts=PROMPTS, params=GREEDY):
    outs = llm.generate(prompts, params)
    llm.engine.block_manager.check_integrity()
    return [o.outputs[0] for o in outs]


def first_token_agreement(got, want):
    agree = sum(g.token_ids[0] == w.token_ids[0] for g, w in zip(got, want))
    lp = [abs(g.logprobs[0][g.token_ids[0]] - w.logprobs[0][w.token_ids[0]])
          for g, w in zip(got, want) if g.token_ids[0] == w.token_ids[0]]
    return agree, max(lp)


def test_fp8_and_fp8_kv_close_to_bf16(tiny_llama):
    bf16 = run(LLM(tiny_llama, device="cuda", dtype="bfloat16", num_kv_blocks=256, max_model_len=512))
    llm = LLM(tiny_llama, device="cuda", dtype="bfloat16", num_kv_blocks=256, max_model_len=512, **FP8)
    assert llm.engine.runner.graphs is not None and llm.engine.runner.ops.name == "triton"
    assert llm.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    got = run(llm)
    agree, lp = first_token_agreement(got, bf16)
    assert agree >= len(PROMPTS) - 2 and lp < 0.2
    same = sum(g.token_ids == w.token_ids for g, w in zip(got, bf16))
    assert same >= len(PROMPTS) // 2


def test_fp8_gpu_equals_cpu_reference(tiny_llama):
    """Same quantization on both: the GPU differs only by rounding (bf16 GEMM outputs)."""
    kw = dict(dtype="float32", num_kv_blocks=256, max_model_len=512, **FP8)
    cpu = run(LLM(tiny_llama, device="cpu", **kw))
    for eager in (True, False):
        got = run(LLM(tiny_llama, device="cuda", enforce_eager=eager, **kw))
        agree, lp = first_token_agreement(got, cpu)
        assert agree >= len(PROMPTS) - 1 and lp < 0.05


@pytest.mark.parametrize("name,kv", [("tiny-llama-fp8-dynamic", "auto"), ("tiny-llama-fp8-static", "fp8")])
def test_llm_compressor_fixtures_on_gpu(name, kv):
    from tests.engine.test_fp8_checkpoints import prompt_logprobs, reference_logprobs

    llm = LLM(str(DATA / name), device="cuda", dtype="float32", kv_cache_dtype=kv, num_kv_blocks=64)
    ids, want = reference_logprobs(DATA / name)
    assert (prompt_logprobs(llm, ids) - want).abs().max() < 0.05


def test_fp8_kv_pool_holds_twice_the_blocks(tiny_llama):
    kw = dict(device="cuda", dtype="bfloat16", gpu_memory_utilization=0.2, max_model_len=512, enforce_eager=True)
    bf16 = LLM(tiny_llama, **kw).engine
    fp8 = LLM(tiny_llama, kv_cache_dtype="fp8", **kw).engine
    stats = fp8.stats()
    assert stats.kv_cache_dtype == "float8_e4m3fn"
    assert stats.num_blocks_at_model_dtype * 2 == pytest.approx(stats.num_total_blocks, rel=0.01)
    assert fp8.num_kv_blocks == pytest.approx(2 * bf16.num_kv_blocks, rel=0.05)
