"""Building the model on its device and filling it: from safetensors checkpoints, or random (dummy)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from gpu_engine.config import ModelConfig
from gpu_engine.errors import ModelLoadError
from gpu_engine.model import CausalLM

# HF tensor names that carry no weights of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """The model with uninitialised parameters, allocated directly on `device` in `dtype`."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty unties shared parameters
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def _targets(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """HF name -> (our parameter name, row offset, rows) for every tensor a checkpoint must hold."""
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    out: dict[str, tuple[str, int, int]] = {
        "model.embed_tokens.weight": ("embed_tokens.weight", 0, cfg.vocab_size),
        "model.norm.weight": ("norm", 0, cfg.hidden_size),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ("lm_head.weight", 0, cfg.vocab_size)
    for i in range(cfg.num_layers):
        hf, me = f"model.layers.{i}.", f"layers.{i}."
        parts = {
            "self_attn.q_proj": ("qkv_proj", 0, q, cfg.qkv_bias),
            "self_attn.k_proj": ("qkv_proj", q, kv, cfg.qkv_bias),
            "self_attn.v_proj": ("qkv_proj", q + kv, kv, cfg.qkv_bias),
            "self_attn.o_proj": ("o_proj", 0, cfg.hidden_size, cfg.o_bias),
            "mlp.gate_proj": ("gate_up_proj", 0, inter, cfg.mlp_bias),
            "mlp.up_proj": ("gate_up_proj", inter, inter, cfg.mlp_bias),
            "mlp.down_proj": ("down_proj", 0, cfg.hidden_size, cfg.mlp_bias),
        }
        for src, (dst, off, rows, bias) in parts.items():
            out[f"{hf}{src}.weight"] = (f"{me}{dst}.weight", off, rows)
            if bias:
                out[f"{hf}{src}.bias"] = (f"{me}{dst}.bias", off, rows)
        out[f"{hf}input_layernorm.weight"] = (f"{me}input_layernorm", 0, cfg.hidden_size)
        out[f"{hf}post_attention_layernorm.weight"] = (f"{me}post_attention_layernorm", 0, cfg.hidden_size)
        if cfg.qk_norm:
            out[f"{hf}self_attn.q_norm.weight"] = (f"{me}q_norm", 0, cfg.head_dim)
            out[f"{hf}self_attn.k_norm.weight"] = (f"{me}k_norm", 0, cfg.head_dim)
    return out


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (sharded through an index, or all of them)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"{index} is malformed: {exc!r}") from exc
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shards named in the index are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {pickles}: pickled checkpoints are never loaded; convert them to safetensors)" if pickles else ""
        raise ModelLoadError(f"no *.safetensors files in {folder}{hint}")
    return files


def load_checkpoint(model: CausalLM, folder: Path, cfg: ModelConfig, progress: bool = True) -> None:
    """Copy every tensor of the checkpoint into the model, checking names and shapes against the config."""
    targets = _targets(cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    files = checkpoint_files(folder)
    seen: set[str] = set()
    with tqdm(total=len(targets), desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                        continue
                    if name not in targets:
                        raise ModelLoadError(
                            f"{path.name}: tensor {name!r} does not belong to a {cfg.architecture} with this config"
                        )
                    dst, off, rows = targets[name]
                    param = params[dst]
                    tensor = f.get_tensor(name)
                    want = (rows, *param.shape[1:])
                    if tuple(tensor.shape) != want:
                        raise ModelLoadError(
                            f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"but config.json implies {want}"
                        )
                    param.data[off : off + rows].copy_(tensor.to(param.dtype))
                    seen.add(name)
                    bar.update(1)
    missing = sorted(set(targets) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint in {folder} lacks tensors the config needs: {shown}")


def init_dummy_weights(model: CausalLM, seed: int) -> None:
    """Random weights made on the model's device: N(0, 0.02) matrices, unit norms, zero biases."""
    gen = torch.Generator(device=model.norm.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            if name.endswith("bias"):
                param.data.zero_()
            else:
                param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=gen)
