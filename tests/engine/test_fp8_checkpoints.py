"""Checkpoints that llm-compressor wrote (tests/data, made by tests/data/make_fp8_fixtures.py) load
and give llm-compressor's own fake-quantized logits; online FP8 stays close to the unquantized
model; a pre-quantized checkpoint is recognised without a flag, and a contradicting flag fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpu_engine.errors import ModelLoadError
from gpu_engine.quant.fp8 import Fp8Linear
from taxiway import LLM, SamplingParams

DATA = Path(__file__).resolve().parent.parent / "data"
DYNAMIC, STATIC = DATA / "tiny-llama-fp8-dynamic", DATA / "tiny-llama-fp8-static"


def prompt_logprobs(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    """[sum(L - 1)]: log p(token j | tokens < j) of every prompt token after the first, flattened."""
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0))
    return torch.tensor([lp[t] for o in outs for lp, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])],
                        dtype=torch.float64)


def reference_logprobs(folder: Path) -> tuple[list[list[int]], torch.Tensor]:
    ref = load_file(str(folder.parent / f"{folder.name}.reference.safetensors"))
    ids, logits = ref["prompt_ids"], ref["logits"]
    lps = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return ids.tolist(), lps.flatten()


@pytest.mark.parametrize("folder,kv", [(DYNAMIC, "auto"), (STATIC, "fp8")])
def test_llm_compressor_checkpoints_match_its_own_outputs(folder, kv):
    llm = LLM(str(folder), device="cpu", kv_cache_dtype=kv, num_kv_blocks=64)
    spec = llm.engine.quant_spec
    assert spec.source == "compressed-tensors" and spec.method == "fp8"
    layer = llm.engine.runner.model.layers[0]
    assert isinstance(layer.qkv_proj, Fp8Linear) and layer.qkv_proj.weight.dtype == torch.float8_e4m3fn
    if kv == "fp8":
        assert llm.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
        assert layer.kv_scale != (1.0, 1.0), "the checkpoint's k_scale / v_scale are used"
    ids, want = reference_logprobs(folder)
    got = prompt_logprobs(llm, ids)
    print("max |logprob - llm-compressor's|", float((got - want).abs().max()))
    assert (got - want).abs().max() < 1e-4  # measured: under 1e-6


def test_fused_parts_keep_their_per_tensor_scales():
    """q/k/v carry scales ~7x apart in the static fixture: each part's rows keep their own scale,
    and the fused input scale is the largest of the three (it clips none of them)."""
    llm = LLM(str(STATIC), device="cpu", num_kv_blocks=64)
    tensors = load_file(str(STATIC / "model.safetensors"))
    qkv = llm.engine.runner.model.layers[1].qkv_proj
    p = "model.layers.1.self_attn."
    parts = [tensors[p + f"{n}_proj.weight_scale"].item() for n in "qkv"]
    assert max(parts) / min(parts) > 5
    rows = torch.tensor(parts).repeat_interleave(torch.tensor(qkv.parts))
    assert torch.equal(qkv.weight_scale, rows)
    assert torch.equal(qkv.weight, torch.cat([tensors[p + f"{n}_proj.weight"] for n in "qkv"]))
    assert qkv.input_scale.item() == max(tensors[p + f"{n}_proj.input_scale"].item() for n in "qkv")


def test_online_fp8_close_to_unquantized(tiny_llama):
    prompts = [[5, 17, 99, 3, 250, 41, 7, 7, 100, 12], [300, 2, 9, 88, 61, 14]]
    base = prompt_logprobs(LLM(tiny_llama, device="cpu", num_kv_blocks=64), prompts)
    llm = LLM(tiny_llama, device="cpu", quantization="fp8", kv_cache_dtype="fp8", num_kv_blocks=64)
    assert llm.engine.quant_spec.source == "online"
    got = prompt_logprobs(llm, prompts)
    assert (got - base).abs().mean() < 0.05 and (got - base).abs().max() < 0.3
    assert (got - base).abs().max() > 0, "the quantized model is not the unquantized one"


def test_checkpoint_recognised_without_flag_and_contradiction_fails():
    llm = LLM(str(DYNAMIC), device="cpu", quantization="fp8", num_kv_blocks=64)  # agrees: fine
    assert llm.engine.quant_spec.source == "compressed-tensors"
    with pytest.raises(ModelLoadError, match="quantization='awq' contradicts the checkpoint"):
        LLM(str(DYNAMIC), device="cpu", quantization="awq", num_kv_blocks=64)


def test_missing_scale_tensor_is_named(tmp_path):
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(STATIC, tmp_path / "m")
    tensors = load_file(str(STATIC / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight_scale \(float \[\] or \[1\]"):
        LLM(str(tmp_path / "m"), device="cpu", num_kv_blocks=64)


def test_unquantized_checkpoint_with_awq_flag_fails(tiny_llama):
    with pytest.raises(ModelLoadError, match="taxiway quantize --method awq"):
        LLM(tiny_llama, device="cpu", quantization="awq", num_kv_blocks=64)
