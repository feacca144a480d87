"""Reading INT4 checkpoints (AutoAWQ GEMM, compressed-tensors pack-quantized W4A16): the scheme
from config.json's quantization_config, every linear in canonical form, and, for the CPU path and
quality checks, the model with dequantized weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from gpu_engine.config import ModelConfig
from gpu_engine.errors import ModelLoadError
from gpu_engine.model import CausalLM
from gpu_engine.quant import int4
from gpu_engine.quant.awq_export import linear_parts
from gpu_engine.quant.int4 import Int4FormatError, Int4Weight
from gpu_engine.quant.spec import QuantSpec
from gpu_engine.weights import build_model, checkpoint_files

LEAVES = {"autoawq": ("qweight", "qzeros", "scales"),
          "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
"""The tensors (leaf names under a linear's prefix) each INT4 format stores per linear."""


@dataclass(frozen=True)
class Int4Scheme:
    """What an INT4 checkpoint's config.json promises."""

    fmt: str  # "autoawq" | "compressed-tensors"
    group_size: int | None  # None: one group per row (compressed-tensors channel strategy); -1 AutoAWQ's
    symmetric: bool

    @classmethod
    def from_quantization_config(cls, qc: dict) -> "Int4Scheme":
        method = str(qc.get("quant_method", "")).lower()
        if method == "awq":
            return cls._awq(qc)
        if method == "compressed-tensors":
            return cls._compressed_tensors(qc)
        raise Int4FormatError(f"quant_method {method!r} is not an INT4 format; expected awq or compressed-tensors")

    @classmethod
    def _awq(cls, qc: dict) -> "Int4Scheme":
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise Int4FormatError(f"AWQ bits {bits!r} are not supported; expected 4")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise Int4FormatError(f"AWQ version {version!r} is not supported; expected gemm")
        group = qc.get("group_size", qc.get("q_group_size"))
        if not isinstance(group, int) or (group < 1 and group != -1):
            raise Int4FormatError(f"AWQ group_size {group!r} is not supported; expected a positive int or -1")
        if qc.get("modules_to_not_convert"):
            raise Int4FormatError(
                f"AWQ modules_to_not_convert {qc['modules_to_not_convert']!r} is not supported yet: "
                "every decoder linear must be quantized")
        return cls("autoawq", group, not bool(qc.get("zero_point", True)))

    @classmethod
    def _compressed_tensors(cls, qc: dict) -> "Int4Scheme":
        groups = qc.get("config_groups") or {}
        if len(groups) != 1:
            raise Int4FormatError(f"compressed-tensors config_groups has {len(groups)} groups; expected 1")
        (group,) = groups.values()
        fmt = group.get("format") or qc.get("format")
        if fmt != "pack-quantized":
            raise Int4FormatError(f"compressed-tensors format {fmt!r} is not an INT4 format; expected pack-quantized")
        if group.get("input_activations") is not None:
            raise Int4FormatError("compressed-tensors input_activations are set; W4A16 expects none")
        w = group.get("weights") or {}
        if w.get("num_bits") != 4 or w.get("type") != "int":
            raise Int4FormatError(
                f"compressed-tensors weights num_bits={w.get('num_bits')!r} type={w.get('type')!r}; expected 4, int")
        strategy = w.get("strategy")
        if strategy not in ("group", "channel"):
            raise Int4FormatError(f"compressed-tensors weight strategy {strategy!r}; expected group or channel")
        if w.get("actorder") not in (None, False, "weight", "static"):
            raise Int4FormatError(f"compressed-tensors actorder {w.get('actorder')!r} (g_idx) is not supported")
        gs = w.get("group_size") if strategy == "group" else None
        if strategy == "group" and (not isinstance(gs, int) or gs < 1):
            raise Int4FormatError(f"compressed-tensors group_size {gs!r}; expected a positive int")
        return cls("compressed-tensors", gs, bool(w.get("symmetric", True)))


    @classmethod
    def from_spec(cls, spec: QuantSpec) -> "Int4Scheme":
        """The scheme of a detected AWQ checkpoint (gpu_engine/quant/detect.py)."""
        fmt = {"awq": "autoawq", "compressed-tensors": "compressed-tensors"}.get(spec.source)
        if fmt is None or spec.weights.num_bits != 4 or spec.weights.type != "int":
            raise Int4FormatError(f"{spec.describe()} is not an INT4 checkpoint format")
        group = spec.weights.group_size
        if group is None and fmt == "autoawq":
            group = -1  # AutoAWQ's spelling of one group per row
        return cls(fmt, group, spec.weights.symmetric)


def read_scheme(folder: Path) -> Int4Scheme:
    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if not qc:
        raise Int4FormatError(f"{folder}/config.json has no quantization_config")
    return Int4Scheme.from_quantization_config(qc)


def read_int4_checkpoint(folder: Path, cfg: ModelConfig) -> tuple[dict[str, Int4Weight], dict[str, torch.Tensor]]:
    """(INT4 linears by HF prefix, e.g. model.layers.0.self_attn.q_proj; every other tensor by name)."""
    scheme = read_scheme(folder)
    leaves = LEAVES[scheme.fmt]
    raw: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                prefix, _, leaf = name.rpartition(".")
                if leaf in leaves:
                    raw.setdefault(prefix, {})[leaf] = f.get_tensor(name)
                else:
                    dense[name] = f.get_tensor(name)
    linears = {}
    for i in range(cfg.num_layers):
        for ours, parts in linear_parts(cfg).items():
            k = cfg.intermediate_size if ours == "down_proj" else cfg.q_size if ours == "o_proj" else cfg.hidden_size
            for hf, _, rows in parts:
                prefix = f"model.layers.{i}.{hf}"
                t = raw.pop(prefix, None)
                if t is None:
                    raise ModelLoadError(f"{folder}: the INT4 tensors of {prefix} ({', '.join(leaves)}) are missing")
                linears[prefix] = read_linear(scheme, t, k, rows, prefix)
    if raw:
        raise ModelLoadError(f"{folder}: INT4 tensors of modules this model lacks: {sorted(raw)[:5]}")
    return linears, dense


def read_linear(s: Int4Scheme, t: dict[str, torch.Tensor], k: int, n: int, name: str) -> Int4Weight:
    """One linear (k inputs, n outputs) in canonical form from its tensors by leaf name."""
    if s.fmt == "autoawq":
        return int4.from_autoawq(t.get("qweight"), t.get("qzeros"), t.get("scales"), in_features=k,
                                 out_features=n, group_size=s.group_size, zero_point=not s.symmetric, name=name)
    return int4.from_compressed_tensors(
        t.get("weight_packed"), t.get("weight_scale"), t.get("weight_zero_point"), t.get("weight_shape"),
        in_features=k, out_features=n, group_size=s.group_size, symmetric=s.symmetric, name=name)


def load_dequantized(folder: str | Path, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> tuple[CausalLM, ModelConfig]:
    """Our CausalLM with every INT4 linear dequantized (the CPU reference of an INT4 checkpoint)."""
    folder = Path(folder)
    cfg = ModelConfig.from_folder(folder)
    linears, dense = read_int4_checkpoint(folder, cfg)
    model = build_model(cfg, dtype, torch.device(device))
    params = dict(model.named_parameters(remove_duplicate=False))
    for i in range(cfg.num_layers):
        for ours, parts in linear_parts(cfg).items():
            for hf, off, rows in parts:
                prefix = f"model.layers.{i}.{hf}"
                params[f"layers.{i}.{ours}.weight"].data[off:off + rows] = linears[prefix].dequantize(dtype)
                if f"{prefix}.bias" in dense:
                    params[f"layers.{i}.{ours}.bias"].data[off:off + rows] = dense.pop(f"{prefix}.bias").to(dtype)
    names = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm",
             "lm_head.weight": "lm_head.weight"}
    for i in range(cfg.num_layers):
        for hf, ours in (("input_layernorm", "input_layernorm"), ("post_attention_layernorm", "post_attention_layernorm"),
                         ("self_attn.q_norm", "q_norm"), ("self_attn.k_norm", "k_norm")):
            names[f"model.layers.{i}.{hf}.weight"] = f"layers.{i}.{ours}"
    seen = set()
    for name, t in dense.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name not in names or names[name] not in params:
            raise ModelLoadError(f"{folder}: tensor {name!r} does not belong to this model")
        params[names[name]].data.copy_(t.to(dtype))
        seen.add(name)
    needed = {hf for hf, ours in names.items() if ours in params}
    needed -= {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if needed - seen:
        raise ModelLoadError(f"{folder}: the checkpoint lacks {sorted(needed - seen)[:5]}")
    return model, cfg
