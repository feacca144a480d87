"""INT4 AWQ (W4A16) in the engine on a GPU: the Triton W4A16 paths (gemv at batch 1, tensor-core mm
for small batches, dequantize + cuBLAS for prefills of 1024+ tokens) eager and in CUDA graphs,
against the CPU reference engine on the same checkpoint; dummy INT4 weights at Llama-3.1-8B's
shapes store what the roofline says (about 4.7 GB with the BF16 LM head)."""

from pathlib import Path

import pytest
import torch

from gpu_engine.roofline import decode_step_bytes
from taxiway import LLM, SamplingParams
from tests.engine.hf import random_prompts
from tests.engine.test_awq_checkpoints import rtn_checkpoint, wide  # noqa: F401 (fixture)
from tests.engine.test_fp8_checkpoints import prompt_logprobs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

AUTOAWQ = Path(__file__).resolve().parent.parent / "data" / "tiny-llama-autoawq"
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0)


def run(llm, prompts, params=GREEDY):
    outs = llm.generate(prompts, params)
    llm.engine.block_manager.check_integrity()
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("dtype,atol", [("float32", 2e-3), ("float16", 5e-2)])
def test_autoawq_checkpoint_gpu_equals_cpu_reference(dtype, atol):
    prompts = random_prompts(6, 256, seed=3, lengths=[1, 5, 17, 40, 64, 100])
    prompts = [p for p in prompts if len(p) > 1]
    cpu = prompt_logprobs(LLM(str(AUTOAWQ), device="cpu", num_kv_blocks=64), prompts)
    for eager in (True, False):
        llm = LLM(str(AUTOAWQ), device="cuda", dtype=dtype, enforce_eager=eager, num_kv_blocks=128)
        assert llm.engine.runner.model.layers[0].qkv_proj.qweight.is_cuda
        got = prompt_logprobs(llm, prompts)
        assert (got - cpu).abs().max() < atol, (dtype, eager, float((got - cpu).abs().max()))


def test_every_w4a16_path_agrees_with_cpu(wide, tmp_path):  # noqa: F811
    """Group 128 asymmetric: a 1100-token prompt prefills through dequantize + cuBLAS, 12 prompts
    decode through mm (CUDA graphs), one prompt alone through gemv."""
    folder = rtn_checkpoint(wide, tmp_path / "q", "autoawq", 128, True)
    long = random_prompts(1, 320, seed=1, lengths=[1100])
    batch = random_prompts(12, 320, seed=2, lengths=[3, 9, 16, 30, 33, 64, 65, 90, 120, 7, 12, 50])
    kw = dict(dtype="float32", num_kv_blocks=256, max_model_len=1200)
    for prompts in (long, batch, batch[:1]):
        cpu = run(LLM(str(folder), device="cpu", **kw), prompts)
        got = run(LLM(str(folder), device="cuda", max_prefill_tokens_per_seq=2048, **kw), prompts)
        agree = sum(g.token_ids[0] == c.token_ids[0] for g, c in zip(got, cpu))
        assert agree == len(prompts)
        lp = max(abs(g.logprobs[0][g.token_ids[0]] - c.logprobs[0][c.token_ids[0]]) for g, c in zip(got, cpu))
        assert lp < 2e-3


def test_dummy_awq_at_llama_8b_shapes():
    llm = LLM("llama-3.1-8b", load_format="dummy", quantization="awq", dtype="bfloat16", device="cuda",
              max_num_seqs=8, max_model_len=512, num_kv_blocks=64)
    model = llm.engine.runner.model
    assert llm.engine.quant_spec.source == "dummy" and model.layers[0].down_proj.group_size == 128
    weights = decode_step_bytes(model, 1, 0, 0).weights
    assert 4.6e9 < weights < 4.8e9, weights  # INT4 g128 linears (3.65 GB) + BF16 lm_head (1.05 GB) + norms
    assert llm.engine.runner.graphs is not None
    outs = run(llm, random_prompts(4, 128000, seed=0, lengths=[5, 50, 128, 300]))
    assert all(len(o.token_ids) == 16 for o in outs)
