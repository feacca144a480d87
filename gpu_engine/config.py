"""Configuration: the model's shape (read from config.json or a preset) and the engine's knobs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gpu_engine.errors import ModelLoadError

# Architectures served by the one Llama-family implementation, and how each differs.
_ARCH_TRAITS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
}

# Full-size architectures for benchmarks (load_format="dummy"): no checkpoint needed.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "intermediate_size": 14336, "vocab_size": 128256, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
    },
    "llama-3.1-70b": {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
        "intermediate_size": 28672, "vocab_size": 128256, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
    },
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
        "vocab_size": 152064, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "tie_word_embeddings": False, "bos_token_id": 151643,
        "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "intermediate_size": 12288, "vocab_size": 151936, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family model; per-architecture differences are flags, not copies."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    name: str = ""

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], name: str = "") -> "ModelConfig":
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in _ARCH_TRAITS:
            raise ModelLoadError(
                f"architecture {arch!r} is not supported; supported: {', '.join(_ARCH_TRAITS)}"
            )
        traits = _ARCH_TRAITS[arch]
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rope = _rope_settings(cfg)
            bias = bool(cfg.get("attention_bias") or False)
            window = cfg.get("sliding_window")
            if arch != "MistralForCausalLM" and not cfg.get("use_sliding_window", False):
                window = None
            eos = cfg.get("eos_token_id")
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate_size=int(cfg["intermediate_size"]),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope[0],
                rope_scaling=rope[1],
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=traits.get("qkv_bias", bias),
                o_bias=bias,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=traits.get("qk_norm", False),
                sliding_window=int(window) if window else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
                torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
                name=name,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"config of {name or 'the model'} is malformed: {exc!r}") from exc

    @classmethod
    def from_folder(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"no config.json in {path}")
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{cfg_file} is not valid JSON: {exc}") from exc
        return cls.from_dict(cfg, name=str(path))

    @classmethod
    def from_preset(cls, preset: str) -> "ModelConfig":
        if preset not in PRESETS:
            raise ModelLoadError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        return cls.from_dict(PRESETS[preset], name=preset)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _rope_settings(cfg: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from either the transformers 4 keys or transformers 5 `rope_parameters`."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", cfg.get("rope_theta") or 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(cfg.get("rope_theta") or 10000.0)
        scaling = dict(cfg.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("llama3", "linear"):
        raise ModelLoadError(f"rope scaling {rope_type!r} is not supported (supported: llama3, linear)")
    scaling["rope_type"] = rope_type
    return theta, scaling


_DTYPES = ("auto", "float32", "bfloat16", "float16")
_POLICIES = ("max_utilization", "guaranteed_no_evict")
_QUANTIZATIONS = (None, "fp8", "awq")  # as vLLM names them; gpu_engine/quant serves them
_KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass(frozen=True)
class EngineConfig:
    """Everything `LLM(...)` / `LLMEngine` accept. Facts measured at start-up (the number of KV
    blocks) are reported by the engine, never written back here."""

    model: str | None = None
    """An HF folder; a preset name (with load_format="dummy"); None for the default model."""
    tokenizer: str | None = None
    """Folder holding tokenizer.json; defaults to the model folder."""
    dtype: str = "auto"
    """auto: float32 on the CPU; the checkpoint's 16-bit dtype (else bfloat16) on a GPU."""
    device: str = "auto"
    """auto: cuda if available, else cpu."""
    load_format: str = "auto"
    """auto/safetensors: read the checkpoint; dummy: random weights made on the device."""
    seed: int = 0
    """Seeds dummy weights and the seeds given to requests that bring none."""
    max_model_len: int | None = None
    """Longest prompt + output; defaults to the model's max_position_embeddings."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU's memory the engine may use (weights, activations, KV cache)."""
    cpu_kv_cache_gib: float = 1.0
    """KV-cache size on the CPU, in GiB."""
    num_kv_blocks: int | None = None
    """Force the number of KV blocks (tests, tiny pools); overrides the two settings above."""
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 8192
    """Token budget of one step (decodes + prefill chunks)."""
    max_num_seqs: int = 256
    """Most sequences running at once."""
    enable_chunked_prefill: bool = True
    admission_policy: str = "max_utilization"
    """max_utilization: admit while blocks are free, preempt the newest on exhaustion (recompute);
    guaranteed_no_evict: admit only when prompt + max_tokens is reserved for every running request."""
    enforce_eager: bool = False
    """GPU only: no CUDA graphs."""
    async_scheduling: bool | None = None
    """Plan and launch step N+1 while step N runs (outputs trail by one step). None: on with a
    GPU, off on the CPU (where nothing would overlap)."""
    quantization: str | None = None
    """None: as the checkpoint is (a pre-quantized one is recognised from its config);
    fp8: FP8 W8A8 (a 16/32-bit checkpoint, or dummy weights, is quantized at load: per-channel
    weight scales, per-token activation scales); awq: an INT4 AWQ checkpoint. A value that
    contradicts the checkpoint is an error."""
    kv_cache_dtype: str = "auto"
    """auto: the KV cache in the model's dtype; fp8: E4M3 with per-layer scales (the checkpoint's
    k_scale/v_scale when it has them, else 1.0), about twice the blocks in the same memory."""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"load_format must be auto, safetensors or dummy, got {self.load_format!r}")
        if self.admission_policy not in _POLICIES:
            raise ValueError(f"admission_policy must be one of {_POLICIES}, got {self.admission_policy!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.quantization not in _QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {_QUANTIZATIONS}, got {self.quantization!r}")
        if self.kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {_KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}
