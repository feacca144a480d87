"""The engine on a GPU (Triton kernels, CUDA graphs) against the CPU reference engine."""

import pytest
import torch

from taxiway import LLM, SamplingParams
from tests.engine.hf import random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
PROMPTS = random_prompts(16, 320, seed=3, lengths=[1, 2, 7, 15, 16, 17, 33, 64, 65, 100, 130, 200, 5, 9, 40, 80])


def run(llm, prompts=PROMPTS, params=GREEDY):
    outs = llm.generate(prompts, params)
    llm.engine.block_manager.check_integrity()
    return [o.outputs[0] for o in outs]


@pytest.fixture(scope="module")
def cpu_reference(tiny_checkpoints):
    return {arch: run(LLM(path, device="cpu", num_kv_blocks=256, max_model_len=512))
            for arch, path in tiny_checkpoints.items()}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("eager", [True, False])
def test_float32_greedy_equals_cpu_reference(arch, eager, tiny_checkpoints, cpu_reference):
    llm = LLM(tiny_checkpoints[arch], device="cuda", dtype="float32", num_kv_blocks=256, max_model_len=512,
              enforce_eager=eager, max_num_seqs=32)
    assert llm.engine.runner.ops.name == "triton"
    assert (llm.engine.runner.graphs is None) == eager
    got = run(llm)
    want = cpu_reference[arch]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    diffs = [abs(g.logprobs[i][t] - w.logprobs[i][t]) for g, w in zip(got, want)
             for i, t in enumerate(w.token_ids)]
    assert max(diffs) < 2e-3


def test_bfloat16_first_tokens_agree_and_logprobs_stay_close(tiny_llama, cpu_reference):
    llm = LLM(tiny_llama, device="cuda", dtype="bfloat16", num_kv_blocks=256, max_model_len=512)
    got = run(llm)
    want = cpu_reference["llama"]
    agree = sum(g.token_ids[0] == w.token_ids[0] for g, w in zip(got, want))
    assert agree >= len(want) - 1
    first_lp = [abs(g.logprobs[0][g.token_ids[0]] - w.logprobs[0][w.token_ids[0]])
                for g, w in zip(got, want) if g.token_ids[0] == w.token_ids[0]]
    assert max(first_lp) < 0.1


def test_preemption_chunking_and_prefix_hits_on_gpu(tiny_llama, cpu_reference):
    llm = LLM(tiny_llama, device="cuda", dtype="float32", num_kv_blocks=20, max_model_len=320,
              max_num_batched_tokens=48, max_num_seqs=8)
    got = run(llm)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [g.token_ids for g in got] == [w.token_ids for w in cpu_reference["llama"]]
    again = run(llm)
    assert llm.engine.stats().prefix_cache_hits > 0
    assert [g.token_ids for g in again] == [w.token_ids for w in cpu_reference["llama"]]


def test_default_model_float32_on_gpu_equals_cpu(request):
    pytest.importorskip("gguf")
    default_model_dir = request.getfixturevalue("default_model_dir")
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "1, 2, 3, 4,"]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    cpu = LLM(str(default_model_dir), device="cpu", max_model_len=1024).generate(prompts, params)
    gpu = LLM(str(default_model_dir), device="cuda", dtype="float32", max_model_len=1024).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in gpu] == [o.outputs[0].token_ids for o in cpu]


def test_sampled_decoding_runs_under_graphs(tiny_llama):
    llm = LLM(tiny_llama, device="cuda", num_kv_blocks=256, max_model_len=512)
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7, ignore_eos=True,
                            repetition_penalty=1.1)
    a = run(llm, PROMPTS[:8], params)
    b = run(llm, PROMPTS[:8], params)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
