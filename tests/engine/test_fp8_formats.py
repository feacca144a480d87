"""Other FP8 layouts of the same weights: ModelOpt (hf_quant_config.json, scalar scales,
k_proj.k_scale) and vLLM's own `quant_method: fp8`, made from the llm-compressor static fixture by
renaming, give its outputs; ignored layers; dummy FP8 weights; bytes stored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpu_engine.errors import ModelLoadError
from gpu_engine.quant.fp8 import Fp8Linear
from gpu_engine.quant.linear import DenseLinear, stored_bytes
from taxiway import LLM
from tests.engine.test_fp8_checkpoints import STATIC, prompt_logprobs, reference_logprobs


def _relayout(tmp_path: Path, rename, config_quant: dict | None, modelopt: dict | None, drop=()) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(STATIC, out)
    tensors = load_file(str(STATIC / "model.safetensors"))
    new = {}
    for name, t in tensors.items():
        if any(d in name for d in drop):
            continue
        name, t = rename(name, t)
        new[name] = t
    save_file(new, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config")
    if config_quant is not None:
        cfg["quantization_config"] = config_quant
    (out / "config.json").write_text(json.dumps(cfg))
    if modelopt is not None:
        (out / "hf_quant_config.json").write_text(json.dumps(modelopt))
    return out


def _modelopt_names(name: str, t: torch.Tensor):
    """ModelOpt writes scalar scales and the KV scales under k_proj / v_proj."""
    for which in "kv":
        if name.endswith(f"self_attn.{which}_scale"):
            name = name.replace(f"self_attn.{which}_scale", f"self_attn.{which}_proj.{which}_scale")
    if name.endswith("_scale"):
        t = t.reshape(())
    return name, t


def test_modelopt_fp8_gives_the_same_outputs(tmp_path):
    folder = _relayout(tmp_path, _modelopt_names, None, {
        "producer": {"name": "modelopt", "version": "0.19.0"},
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}})
    llm = LLM(str(folder), device="cpu", kv_cache_dtype="fp8", num_kv_blocks=64)
    assert llm.engine.quant_spec.source == "modelopt"
    ids, want = reference_logprobs(STATIC)
    assert (prompt_logprobs(llm, ids) - want).abs().max() < 1e-4


def test_vllm_fp8_config_and_unused_kv_scales_warn(tmp_path, caplog):
    folder = _relayout(tmp_path, lambda n, t: (n, t), {"quant_method": "fp8", "activation_scheme": "static"}, None)
    with caplog.at_level("WARNING"):
        llm = LLM(str(folder), device="cpu", num_kv_blocks=64)  # kv_cache_dtype auto
    assert llm.engine.quant_spec.source == "fp8"
    assert "KV-cache scales" in caplog.text and "unused" in caplog.text
    assert llm.engine.runner.kv_caches[0][0].dtype == torch.float32


def test_ignored_layers_stay_unquantized_and_partial_fusions_fail(tmp_path):
    tensors = load_file(str(STATIC / "model.safetensors"))
    p = "model.layers.1.mlp.down_proj."

    def dense_down(name, t):
        if name == p + "weight":
            return name, (t.float() * tensors[p + "weight_scale"]).contiguous()
        return name, t

    qcfg = json.loads((STATIC / "config.json").read_text())["quantization_config"]
    qcfg["ignore"] = ["lm_head", "model.layers.1.mlp.down_proj"]
    folder = _relayout(tmp_path, dense_down, qcfg, None, drop=(p + "weight_scale", p + "input_scale"))
    llm = LLM(str(folder), device="cpu", num_kv_blocks=64)
    layer = llm.engine.runner.model.layers[1]
    assert isinstance(layer.down_proj, DenseLinear) and isinstance(layer.gate_up_proj, Fp8Linear)
    assert layer.down_proj.input_quant is None
    prompt_logprobs(llm, [[5, 6, 7, 8]])  # runs
    qcfg["ignore"] = ["lm_head", "model.layers.0.self_attn.k_proj"]
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                    "quantization_config": qcfg}))
    with pytest.raises(ModelLoadError, match="quantizes only some of"):
        LLM(str(folder), device="cpu", num_kv_blocks=64)


def test_wrong_scale_shape_and_dtype_are_named(tmp_path):
    def bad(name, t):
        if name == "model.layers.0.self_attn.q_proj.weight_scale":
            return name, torch.ones(64, 2)
        return name, t

    with pytest.raises(ModelLoadError, match=r"q_proj\.weight_scale' has shape \(64, 2\), expected \[\] or \[1\]"):
        LLM(str(_relayout(tmp_path, bad, json.loads((STATIC / "config.json").read_text())["quantization_config"],
                          None)), device="cpu", num_kv_blocks=64)


def test_dummy_fp8_weights_and_stored_bytes(tiny_llama):
    bf = LLM(tiny_llama, device="cpu", load_format="dummy", num_kv_blocks=64)
    q = LLM(tiny_llama, device="cpu", load_format="dummy", quantization="fp8", kv_cache_dtype="fp8",
            num_kv_blocks=64)
    layer = q.engine.runner.model.layers[0]
    assert isinstance(layer.gate_up_proj, Fp8Linear) and layer.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    assert (layer.gate_up_proj.weight_scale > 0).all()
    dense, fp8 = bf.engine.runner.model.layers[0], layer
    # float32 dummy model: FP8 weights are a quarter of the bytes, plus one f32 scale per row.
    assert stored_bytes(fp8.gate_up_proj) == 256 * 64 + 256 * 4
    assert stored_bytes(dense.gate_up_proj) == 256 * 64 * 4
    stats = q.engine.stats()
    assert stats.kv_cache_dtype == "float8_e4m3fn" and stats.num_blocks_at_model_dtype == 16
    out = q.generate([[5, 6, 7]], )[0].outputs[0].token_ids
    assert len(out) > 0
