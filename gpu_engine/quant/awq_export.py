"""Writing an INT4 checkpoint: AutoAWQ GEMM layout or compressed-tensors pack-quantized, with
config.json's quantization_config as those tools write it, and the tokenizer files beside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from gpu_engine.config import ModelConfig
from gpu_engine.model import CausalLM
from gpu_engine.quant import int4
from gpu_engine.quant.int4 import Int4Weight

OUT_FORMATS = ("autoawq", "compressed-tensors")
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "chat_template.jinja")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def linear_parts(cfg: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
    """Our fused linear -> its HF parts as (name under the layer, first row, rows)."""
    q, kv, inter, h = cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.hidden_size
    return {
        "qkv_proj": [("self_attn.q_proj", 0, q), ("self_attn.k_proj", q, kv), ("self_attn.v_proj", q + kv, kv)],
        "o_proj": [("self_attn.o_proj", 0, h)],
        "gate_up_proj": [("mlp.gate_proj", 0, inter), ("mlp.up_proj", inter, inter)],
        "down_proj": [("mlp.down_proj", 0, h)],
    }


def _rows(wt: Int4Weight, off: int, rows: int) -> Int4Weight:
    sl = slice(off, off + rows)
    return Int4Weight(wt.codes[sl].contiguous(), wt.scales[sl].contiguous(),
                      None if wt.zeros is None else wt.zeros[sl].contiguous(), wt.group_size)


def quantization_config(fmt: str, group_size: int, zero_point: bool) -> dict:
    """config.json's quantization_config, as AutoAWQ / llm-compressor write it."""
    if fmt == "autoawq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": zero_point,
                "version": "gemm", "modules_to_not_convert": None}
    weights = {"num_bits": 4, "type": "int", "symmetric": not zero_point, "strategy": "group",
               "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax",
               "observer_kwargs": {}, "block_structure": None}
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": {}, "transform_config": {},
    }


def write_checkpoint(
    model: CausalLM,
    cfg: ModelConfig,
    quantized: list[dict[str, Int4Weight]],  # per layer: our fused linear name -> INT4 weight
    model_dir: Path,
    out_dir: Path,
    *,
    fmt: str,
    group_size: int,
    zero_point: bool,
) -> Path:
    """Dense tensors from `model` (norms hold the folded AWQ scales), INT4 ones from `quantized`.
    AutoAWQ stores everything in float16; compressed-tensors keeps the checkpoint's dtype."""
    if fmt not in OUT_FORMATS:
        raise ValueError(f"format must be one of {OUT_FORMATS}, got {fmt!r}")
    src = json.loads((model_dir / "config.json").read_text())
    dtype_key = "dtype" if "dtype" in src else "torch_dtype"  # transformers 5 / 4 spelling
    dtype = torch.float16 if fmt == "autoawq" else _DTYPES.get(str(src.get(dtype_key)), torch.bfloat16)
    dense = lambda t: t.detach().to(dtype).cpu().contiguous()  # noqa: E731
    tensors = {"model.embed_tokens.weight": dense(model.embed_tokens.weight), "model.norm.weight": dense(model.norm)}
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = dense(model.lm_head.weight)
    parts = linear_parts(cfg)
    for i, (layer, qlayer) in enumerate(zip(model.layers, quantized)):
        pre = f"model.layers.{i}."
        tensors[pre + "input_layernorm.weight"] = dense(layer.input_layernorm)
        tensors[pre + "post_attention_layernorm.weight"] = dense(layer.post_attention_layernorm)
        if cfg.qk_norm:
            tensors[pre + "self_attn.q_norm.weight"] = dense(layer.q_norm)
            tensors[pre + "self_attn.k_norm.weight"] = dense(layer.k_norm)
        for ours, hf_parts in parts.items():
            bias = getattr(layer, ours).bias
            for hf, off, rows in hf_parts:
                part = _rows(qlayer[ours], off, rows)
                packed = int4.to_autoawq(part) if fmt == "autoawq" else int4.to_compressed_tensors(part, dtype)
                for leaf, t in packed.items():
                    tensors[f"{pre}{hf}.{leaf}"] = t.cpu().contiguous()
                if bias is not None:
                    tensors[f"{pre}{hf}.bias"] = dense(bias[off:off + rows])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    src["quantization_config"] = quantization_config(fmt, group_size, zero_point)
    src[dtype_key] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(src, indent=2) + "\n")
    for name in _COPIED:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    return out_dir
