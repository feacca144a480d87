"""What a quantized model is: the scheme of its weights and activations, read from a checkpoint
(gpu_engine/quant/detect.py) or asked for online. No torch here."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

METHODS = ("fp8", "awq")
KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass(frozen=True)
class WeightScheme:
    """How each linear's weights are stored."""

    num_bits: int
    type: str  # "float" (FP8 E4M3) | "int"
    strategy: str  # "tensor" | "channel" | "group"
    group_size: int | None = None
    symmetric: bool = True


@dataclass(frozen=True)
class ActivationScheme:
    """How a linear's input is quantized (None on a QuantSpec: weight-only, e.g. W4A16)."""

    dynamic: bool  # per token at run time; else one static per-tensor scale from the checkpoint
    strategy: str = "token"  # "token" (dynamic) | "tensor" (static)


@dataclass(frozen=True)
class QuantSpec:
    """One quantization of a model, whichever tool wrote it (or "online": made at load time)."""

    method: str  # "fp8" | "awq": the linear method that serves it
    source: str  # "online" | "compressed-tensors" | "fp8" (vLLM's) | "modelopt" | "awq"
    weights: WeightScheme
    activations: ActivationScheme | None
    serialized: bool  # the checkpoint holds quantized weights (False: quantized at load)
    ignore: tuple[str, ...] = ("lm_head",)
    """HF module names (or "re:" regexes) left unquantized."""
    kv_cache: bool = False
    """The checkpoint carries FP8 KV-cache scales (k_scale / v_scale)."""
    checkpoint_format: str = ""
    """The checkpoint's own name for its layout: float-quantized, pack-quantized, gemm..."""
    extra: dict = field(default_factory=dict, compare=False)
    """Format details a method needs (AWQ: zero_point, version...)."""

    def ignores(self, hf_module: str) -> bool:
        """Is this HF module (e.g. model.layers.0.mlp.down_proj) left unquantized?"""
        return any(_matches(pattern, hf_module) for pattern in self.ignore)

    def describe(self) -> str:
        w = self.weights
        acts = ("weight-only" if self.activations is None else
                "dynamic per-token activations" if self.activations.dynamic else
                "static per-tensor activations")
        grp = f" group {w.group_size}" if w.group_size else ""
        return (f"{self.method} ({self.source}): {w.type}{w.num_bits} weights per {w.strategy}{grp}, "
                f"{acts}" + (", KV-cache scales" if self.kv_cache else ""))


def _matches(pattern: str, name: str) -> bool:
    """compressed-tensors "re:" regexes, ModelOpt fnmatch wildcards, else the name or its suffix."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if "*" in pattern or "?" in pattern:
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def online_fp8() -> QuantSpec:
    """quantization="fp8" on a 16/32-bit checkpoint: per-output-channel weight scales made at
    load time, dynamic per-token activation scales; the LM head stays unquantized."""
    return QuantSpec(
        method="fp8", source="online",
        weights=WeightScheme(num_bits=8, type="float", strategy="channel"),
        activations=ActivationScheme(dynamic=True, strategy="token"),
        serialized=False, checkpoint_format="online",
    )
