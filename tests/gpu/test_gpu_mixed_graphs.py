"""Prefill and mixed steps replayed in pieces (gpu_engine/mixed_graphs.py) against the same steps
run eagerly (max_mixed_graph_tokens=0), and the ops the pieces capture: what a replay computes is
what the eager call computes."""

import pytest
import torch

from gpu_engine.cuda_graphs import capture
from taxiway import LLM, SamplingParams
from tests.engine.hf import random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = random_prompts(12, 320, seed=7, lengths=[1, 2, 7, 16, 17, 33, 64, 65, 100, 130, 200, 40])
QUANT = [{}, {"quantization": "fp8"}, {"quantization": "fp8", "kv_cache_dtype": "fp8"}]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1, prompt_logprobs=1)


def _fp8():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89+")


def assert_same(got, want):
    """The same greedy tokens, and their logprobs and the prompts' within 1e-3 (float32 rounding)."""
    assert [g.outputs[0].token_ids for g in got] == [w.outputs[0].token_ids for w in want]
    diffs = [abs(a[k] - b[k]) for g, w in zip(got, want)
             for a, b in zip(g.outputs[0].logprobs + g.prompt_logprobs[1:],
                             w.outputs[0].logprobs + w.prompt_logprobs[1:])
             for k in b]
    assert max(diffs) < 1e-3


def _replayed(program):
    """(eager result, the captured program's result after one replay)."""
    want = program().clone()
    graph, got = capture(program, torch.device("cuda"), None)
    got.fill_(float("nan")) if got.is_floating_point() else got.zero_()
    graph.replay()
    torch.cuda.synchronize()
    return want, got


@pytest.mark.parametrize("m", [16, 48, 64, 80, 832])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_an_fp8_linear_replays_what_it_computes_eagerly(m, out_dtype):
    _fp8()
    from taxiway_kernels.fp8 import quantize_fp8
    from taxiway_kernels.fp8_gemm import fp8_linear

    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 512, device="cuda", dtype=out_dtype, generator=gen)
    w = (torch.randn(384, 512, device="cuda", generator=gen) * 0.1).to(torch.float8_e4m3fn)
    ws = torch.rand(384, device="cuda", generator=gen) + 0.5
    want, got = _replayed(lambda: fp8_linear(*quantize_fp8(x), w, ws, None, out_dtype))
    assert torch.equal(got, want)


@pytest.mark.parametrize("kw", QUANT, ids=["bf16", "fp8", "fp8-kv"])
@pytest.mark.parametrize("top", [64, 2048])
def test_steps_in_pieces_equal_the_eager_steps(tiny_llama, kw, top):
    if kw:
        _fp8()
    settings = dict(device="cuda", dtype="float32", num_kv_blocks=256, max_model_len=512, max_num_seqs=8,
                    max_num_batched_tokens=256, **kw)
    eager = LLM(tiny_llama, max_mixed_graph_tokens=0, **settings)
    assert eager.engine.runner.mixed_graphs is None
    want = eager.generate(PROMPTS, PARAMS)
    llm = LLM(tiny_llama, max_mixed_graph_tokens=top, **settings)
    assert llm.engine.runner.mixed_graphs.sizes[-1] == min(top, 256)
    got = llm.generate(PROMPTS, PARAMS)
    llm.engine.block_manager.check_integrity()
    assert_same(got, want)


@pytest.mark.parametrize("kw", QUANT, ids=["bf16", "fp8", "fp8-kv"])
def test_every_graph_on_equals_enforce_eager(tiny_llama, kw):
    """Decode graphs and pieces together against no graph at all (float32: only rounding differs)."""
    if kw:
        _fp8()
    settings = dict(device="cuda", dtype="float32", num_kv_blocks=256, max_model_len=512, **kw)
    want = LLM(tiny_llama, enforce_eager=True, **settings).generate(PROMPTS, PARAMS)
    llm = LLM(tiny_llama, **settings)
    assert llm.engine.runner.graphs is not None and llm.engine.runner.mixed_graphs is not None
    got = llm.generate(PROMPTS, PARAMS)
    assert_same(got, want)


def test_eagle3_steps_in_pieces_equal_the_eager_steps(tiny_llama, tmp_path):
    """With EAGLE-3 the pieces also copy the residual streams its head drafts from: the same tokens
    and the same drafts accepted as with every prefill and mixed step eager."""
    from tests.engine.spec_helpers import ALWAYS, random_head

    spec = {"method": "eagle3", "num_speculative_tokens": 3, "model": random_head(tiny_llama, tmp_path), **ALWAYS}
    settings = dict(device="cuda", dtype="float32", num_kv_blocks=256, max_model_len=512, max_num_seqs=8,
                    max_num_batched_tokens=256, speculative_config=spec)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    runs = []
    for top in (0, 256):
        llm = LLM(tiny_llama, max_mixed_graph_tokens=top, **settings)
        assert (llm.engine.runner.mixed_graphs is None) == (top == 0)
        outs = llm.generate(PROMPTS, params)
        llm.engine.block_manager.check_integrity()
        stats = llm.engine.scheduler.spec_stats
        runs.append(([o.outputs[0].token_ids for o in outs], stats.num_draft_tokens, stats.num_accepted_tokens))
    assert runs[1] == runs[0] and runs[0][1] > 0
