"""Recognising quantized checkpoints from their configs, and the errors for what is not served."""

from __future__ import annotations

import copy
import json

import pytest

from gpu_engine.errors import ModelLoadError
from gpu_engine.quant.detect import parse_quantization_config, read_checkpoint_quant, resolve_quantization
from gpu_engine.quant.spec import online_fp8

FP8_DYNAMIC = {  # as llm-compressor 0.14 writes FP8_DYNAMIC (trimmed of null fields)
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "ignore": ["lm_head"], "kv_cache_scheme": None,
    "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "float-quantized",
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False, "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True,
                              "symmetric": True},
        "output_activations": None}},
}


def _with(path: list[str], value, base=FP8_DYNAMIC) -> dict:
    cfg = copy.deepcopy(base)
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return cfg


def test_compressed_tensors_fp8_dynamic_and_static_with_kv():
    spec = parse_quantization_config(FP8_DYNAMIC)
    assert (spec.method, spec.source, spec.weights.strategy, spec.activations.dynamic) == (
        "fp8", "compressed-tensors", "channel", True)
    assert spec.serialized and not spec.kv_cache and spec.ignores("lm_head")
    static = _with(["config_groups", "group_0", "input_activations"],
                   {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False})
    static = _with(["config_groups", "group_0", "weights", "strategy"], "tensor", static)
    static["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
    spec = parse_quantization_config(static)
    assert (spec.weights.strategy, spec.activations.dynamic, spec.kv_cache) == ("tensor", False, True)


def test_compressed_tensors_int4_is_awq_method():
    cfg = _with(["format"], "pack-quantized")
    cfg = _with(["config_groups", "group_0", "format"], "pack-quantized", cfg)
    cfg = _with(["config_groups", "group_0", "weights"],
                {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": False}, cfg)
    cfg = _with(["config_groups", "group_0", "input_activations"], None, cfg)
    spec = parse_quantization_config(cfg)
    assert (spec.method, spec.weights.group_size, spec.weights.symmetric, spec.activations) == ("awq", 128, False, None)
    for order in ("weight", "static"):  # GPTQ's order of calibration only: groups stay contiguous, no g_idx
        assert parse_quantization_config(_with(["config_groups", "group_0", "weights", "actorder"], order, cfg))
    with pytest.raises(ModelLoadError, match="actorder = 'group' is not supported"):
        parse_quantization_config(_with(["config_groups", "group_0", "weights", "actorder"], "group", cfg))
    channel = parse_quantization_config(_with(["config_groups", "group_0", "weights", "strategy"], "channel", cfg))
    assert (channel.weights.strategy, channel.weights.group_size) == ("channel", None)
    with pytest.raises(ModelLoadError, match=r"strategy/group_size = \('block', 128\)"):
        parse_quantization_config(_with(["config_groups", "group_0", "weights", "strategy"], "block", cfg))


@pytest.mark.parametrize("path,value,match", [
    (["config_groups", "group_0", "weights", "strategy"], "block", "strategy = 'block' is not supported"),
    (["config_groups", "group_0", "weights", "num_bits"], 6, r"num_bits/type = \(6, 'float'\)"),
    (["config_groups", "group_0", "input_activations"], None, "W8A8"),
    (["config_groups", "group_0", "input_activations", "strategy"], "tensor", r"\(True, 'tensor'\)"),
    (["config_groups", "group_0", "targets"], ["re:.*q_proj"], "targets"),
    (["format"], "naive-quantized", "format = 'naive-quantized'"),
    (["kv_cache_scheme"], {"num_bits": 8, "type": "float", "strategy": "head", "dynamic": False}, "kv_cache_scheme"),
    (["quant_method"], "gptq", "quant_method 'gptq' is not supported"),
])
def test_unsupported_schemes_name_field_and_value(path, value, match):
    cfg = _with(path, value)
    cfg["config_groups"]["group_0"]["format"] = cfg["format"]
    with pytest.raises(ModelLoadError, match=match):
        parse_quantization_config(cfg)


def test_vllm_fp8_modelopt_and_awq_configs():
    spec = parse_quantization_config({"quant_method": "fp8", "activation_scheme": "static"})
    assert (spec.source, spec.weights.strategy, spec.activations.dynamic) == ("fp8", "tensor", False)
    with pytest.raises(ModelLoadError, match="weight_block_size"):
        parse_quantization_config({"quant_method": "fp8", "weight_block_size": [128, 128]})
    spec = parse_quantization_config({"quant_method": "modelopt", "quant_algo": "FP8",
                                      "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]})
    assert (spec.source, spec.activations.dynamic, spec.kv_cache) == ("modelopt", False, True)
    with pytest.raises(ModelLoadError, match="quant_algo = 'NVFP4'"):
        parse_quantization_config({"quant_method": "modelopt", "quant_algo": "NVFP4"})
    spec = parse_quantization_config({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                                      "version": "gemm"})
    assert (spec.method, spec.weights.group_size, spec.extra["zero_point"]) == ("awq", 64, True)
    spec = parse_quantization_config({"quant_method": "awq", "bits": 4, "group_size": -1, "version": "gemm"})
    assert (spec.weights.strategy, spec.weights.group_size) == ("channel", None)
    for bad, match in (({"bits": 3}, "bits = 3"), ({"version": "gemv"}, "version = 'gemv'"),
                       ({"group_size": 0}, "group_size = 0")):
        with pytest.raises(ModelLoadError, match=match):
            parse_quantization_config({"quant_method": "awq", "bits": 4, "group_size": 128, **bad})


def test_read_checkpoint_quant_from_folders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert read_checkpoint_quant(tmp_path) is None
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "exclude_modules": ["lm_head"]}}))
    assert read_checkpoint_quant(tmp_path).source == "modelopt"
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": FP8_DYNAMIC}))
    assert read_checkpoint_quant(tmp_path).source == "compressed-tensors"


def test_resolve_flag_against_checkpoint():
    ckpt = parse_quantization_config(FP8_DYNAMIC)
    assert resolve_quantization(None, ckpt, dummy=False) is ckpt
    assert resolve_quantization("fp8", ckpt, dummy=False) is ckpt
    with pytest.raises(ModelLoadError, match="contradicts the checkpoint"):
        resolve_quantization("awq", ckpt, dummy=False)
    assert resolve_quantization(None, None, dummy=False) is None
    assert resolve_quantization("fp8", None, dummy=True) == online_fp8()
    with pytest.raises(ModelLoadError, match="needs a checkpoint quantized"):
        resolve_quantization("awq", None, dummy=False)


@pytest.mark.parametrize("pattern,name,hit", [
    ("lm_head", "lm_head", True), ("lm_head", "model.layers.0.mlp.down_proj", False),
    ("re:.*down_proj", "model.layers.3.mlp.down_proj", True), ("re:.*down_proj", "model.layers.3.mlp.up_proj", False),
    ("*.mlp.gate_proj", "model.layers.1.mlp.gate_proj", True), ("down_proj", "model.layers.1.mlp.down_proj", True),
])
def test_ignore_patterns(pattern, name, hit):
    from dataclasses import replace

    assert replace(online_fp8(), ignore=(pattern,)).ignores(name) is hit
