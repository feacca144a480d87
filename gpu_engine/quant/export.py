"""Writing an FP8 checkpoint in the compressed-tensors layout, as llm-compressor writes it
(format float-quantized; `weight` float8_e4m3fn, `weight_scale` [out, 1] per channel; with static
activations an `input_scale` [1] per linear; with KV scales `self_attn.k_scale` / `v_scale` [1]),
so that vLLM, transformers + compressed-tensors and taxiway load it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from gpu_engine.quant.calibrate import Amax, Hessians
from gpu_engine.quant.fp8 import quantize_weight_per_channel
from gpu_engine.quant.gptq import gptq_fp8
from gpu_engine.weights import checkpoint_files

_LINEAR = re.compile(r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
_FUSED = {"self_attn.q_proj": "qkv_proj", "self_attn.k_proj": "qkv_proj", "self_attn.v_proj": "qkv_proj",
          "self_attn.o_proj": "o_proj", "mlp.gate_proj": "gate_up_proj", "mlp.up_proj": "gate_up_proj",
          "mlp.down_proj": "down_proj"}
SHARD_BYTES = 4 << 30


def quantization_config(static: bool, kv: bool) -> dict:
    """config.json's quantization_config, field for field as llm-compressor's FP8 schemes write it."""
    def args(strategy: str, dynamic: bool, observer: str | None) -> dict:
        return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": strategy,
                "block_structure": None, "dynamic": dynamic, "actorder": None, "scale_dtype": None,
                "zp_dtype": None, "observer": observer, "observer_kwargs": {}}

    acts = args("tensor", False, "static_minmax") if static else args("token", True, None)
    return {
        "config_groups": {"group_0": {
            "targets": ["Linear"], "format": "float-quantized",
            "weights": args("channel", False, "minmax"), "input_activations": acts,
            "output_activations": None,
        }},
        "format": "float-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
        "kv_cache_scheme": args("tensor", False, "static_minmax") if kv else None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {},
    }


def _scale(amax: float) -> torch.Tensor:
    return torch.tensor([max(amax, 1e-12) / 448.0], dtype=torch.float32)


def export_fp8(src: Path, out: Path, amax: Amax | None, static: bool, kv: bool, progress: bool = True,
               hessians: Hessians | None = None) -> None:
    """Quantize every decoder linear of the checkpoint in `src` per channel and write `out`.
    `amax` (from calibrate.collect_amax) is needed for static activation scales and KV scales;
    with `hessians` (from the same calibration) the weights are GPTQ-rounded, else to nearest."""
    if (static or kv) and amax is None:
        raise ValueError("static activation scales and KV scales need calibration (amax)")
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    files = checkpoint_files(src)
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            total += len(f.keys())
    with tqdm(total=total, desc="Quantizing", unit="tensor", disable=not progress) as bar:
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    _add(tensors, name, f.get_tensor(name), amax if static else None, hessians)
                    bar.update(1)
    if kv:
        for layer in sorted(amax.k):
            tensors[f"model.layers.{layer}.self_attn.k_scale"] = _scale(amax.k[layer])
            tensors[f"model.layers.{layer}.self_attn.v_scale"] = _scale(amax.v[layer])
    _write_shards(tensors, out)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(static, kv)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in src.iterdir():  # tokenizer, generation config, chat template...
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(extra, out / extra.name)


def _add(tensors: dict[str, torch.Tensor], name: str, t: torch.Tensor, amax: Amax | None,
         hessians: Hessians | None) -> None:
    """One checkpoint tensor into the output: decoder linears' weights quantized, the rest as is."""
    m = _LINEAR.fullmatch(name)
    if m is None:
        tensors[name] = t
        return
    prefix = name.removesuffix(".weight")
    linear = f"layers.{m.group(1)}.{_FUSED[m.group(2)]}"  # our module, whose input this part sees
    if hessians is None:
        q, scale = quantize_weight_per_channel(t)
    else:
        h = hessians.hessian(linear)
        q, scale = gptq_fp8(t.to(h.device), h)
        q, scale = q.cpu(), scale.cpu()
    tensors[name], tensors[prefix + ".weight_scale"] = q, scale.view(-1, 1)
    if amax is not None:
        tensors[prefix + ".input_scale"] = _scale(amax.inputs[linear])


def _write_shards(tensors: dict[str, torch.Tensor], out: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
