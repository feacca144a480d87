"""Configuration: the model's shape (read from config.json or a preset) and the engine's knobs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gpu_engine.errors import ModelLoadError
from gpu_engine.spec.config import SpeculativeConfig, parse_speculative_config

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


def setting(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse
    """A documented config field. `taxiway serve`, `taxiway bench` and `LLM(...)` are all built from
    these fields (their flags, TAXIWAY_* variables and YAML keys), so a setting is declared once."""
    return field(default=default, metadata={"help": help})


MAX_MIXED_GRAPH_TOKENS = 2048
"""The largest step whose forward is captured in pieces (gpu_engine/mixed_graphs.py)."""


@dataclass(frozen=True)
class EngineConfig:
    """Everything `LLM(...)` / `LLMEngine` accept: the single declaration of every engine setting.
    Facts measured at start-up (the number of KV blocks) are reported by the engine, never written
    back here."""

    model: str | None = setting(
        None, "model: a Hugging Face folder (config.json, *.safetensors, tokenizer.json), or a "
              "preset name with load_format=dummy; default: SmolLM2-135M-Instruct")
    tokenizer: str | None = setting(None, "folder holding tokenizer.json (default: the model folder)")
    dtype: str = setting(
        "auto", "weights and activations dtype: auto, float32, bfloat16, float16 (auto: float32 on "
                "the CPU, the checkpoint's 16-bit dtype, else bfloat16, on a GPU)")
    device: str = setting("auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1")
    load_format: str = setting(
        "auto", "auto/safetensors: read the checkpoint; dummy: random weights made on the device "
                "(benchmarks), a speculative draft model's or EAGLE-3 head's too (its folder needs "
                "only config.json)")
    seed: int = setting(0, "seeds dummy weights and the seeds given to requests that bring none")
    max_model_len: int | None = setting(
        None, "longest prompt + output per request (default: the model's max_position_embeddings)")
    block_size: int = setting(16, "tokens per KV-cache block (a power of two)")
    gpu_memory_utilization: float = setting(
        0.9, "fraction of the GPU's memory the engine may use (weights, activations, KV cache)")
    cpu_kv_cache_gib: float = setting(1.0, "KV-cache size on the CPU, in GiB")
    num_kv_blocks: int | None = setting(
        None, "force the number of KV blocks (tests, tiny pools); overrides the two settings above")
    enable_prefix_caching: bool = setting(True, "reuse the KV blocks of identical prompt prefixes")
    max_num_batched_tokens: int | None = setting(
        None, "token budget of one step (decodes + prefill chunks); default 8192, and 16384 for "
              "LLM(...) on a GPU with at least 70 GiB other than an A100 (vLLM's LLM-class default: "
              "an offline batch prefills in fewer, larger steps; a server keeps 8192, as a step's "
              "length is the inter-token latency of every stream)")
    max_num_seqs: int | None = setting(
        None, "most sequences running at once (the persistent batch's slots; decode CUDA graphs are "
              "captured up to min(this, 4096)); default by the device: 1024 on a GPU with at least "
              "70 GiB (H100/H200 class), 256 on smaller GPUs and on the CPU")
    max_prefill_tokens_per_seq: int | None = setting(
        None, "most prompt tokens one sequence prefills per step, so that running decodes keep "
              "flowing beside a long prompt and several prompts share a step's budget (default: "
              "128 on the CPU, where such a step of the default model stays near a quarter of a "
              "second on 2 cores; 2048 on a GPU, where a chunk that size still fills the GPU)")
    enable_chunked_prefill: bool = setting(
        True, "split prompts that do not fit a step's remaining token budget across steps")
    admission_policy: str = setting(
        "max_utilization",
        "max_utilization: admit while blocks are free, preempt the newest on exhaustion "
        "(recompute); guaranteed_no_evict: admit only when prompt + max_tokens is reserved for "
        "every running request")
    admission_tail_overcommit: float = setting(
        0.0, "guaranteed_no_evict only: when the whole waiting queue would fit in this fraction of "
             "the KV pool beyond what the running requests reserve (the end of an offline batch, "
             "whose last requests would otherwise run alone), admit all of it; a request that then "
             "finds no free block is preempted and recomputed, as under max_utilization (0: never; "
             "at most 1)")
    enforce_eager: bool = setting(False, "GPU only: no CUDA graphs")
    max_mixed_graph_tokens: int = setting(
        MAX_MIXED_GRAPH_TOKENS, "GPU only: prefill and mixed steps of up to this many tokens replay "
        "CUDA graphs captured in pieces between the layers' attentions, which cuts their host time "
        f"(0: they run eagerly; at most {MAX_MIXED_GRAPH_TOKENS}: beyond, the GPU's time hides the host's)")
    async_scheduling: bool | None = setting(
        None, "plan and launch step N+1 while step N runs (outputs trail by one step); default: on "
              "with a GPU, off on the CPU (where nothing would overlap)")
    speculative_config: dict | None = setting(
        None, "speculative decoding, as vLLM spells it: {\"method\": \"ngram\" | \"draft_model\" | "
              "\"eagle3\", \"num_speculative_tokens\": k, \"model\": folder (draft checkpoint or "
              "EAGLE-3 head), \"prompt_lookup_min\"/\"prompt_lookup_max\" (ngram), "
              "\"disable_above_batch_size\": n}")
    quantization: str | None = setting(
        None, "None: as the checkpoint is (a pre-quantized one is recognised from its config); fp8: "
              "FP8 W8A8 (a 16/32-bit checkpoint, or dummy weights, is quantized at load: per-channel "
              "weight scales, per-token activation scales); awq: an INT4 AWQ checkpoint (AutoAWQ or "
              "compressed-tensors pack-quantized; with dummy weights: random INT4 in groups of 128). A "
              "value that contradicts the checkpoint is an error")
    kv_cache_dtype: str = setting(
        "auto", "auto: the KV cache in the model's dtype; fp8: E4M3 with per-layer scales (the "
                "checkpoint's k_scale/v_scale when it has them, else 1.0), about twice the blocks in "
                "the same memory")
    v_cache_token_major: bool = setting(
        False, "store V with each block's tokens contiguous per dimension (K stays as it is): the "
               "decode attention over an FP8 cache then reads V without byte-wise shared loads "
               "(bench/compile_report.py: a third fewer instructions per tile); the prefill kernel "
               "spends more; not yet measured on a GPU, so off by default")
    tensor_parallel_size: int = setting(
        1, "split the model across this many devices (Megatron tensor parallelism: one process per "
           "rank, NCCL on GPUs cuda:0..N-1, gloo on the CPU); attention heads, intermediate size and "
           "vocabulary must divide by it; KV heads are split, or replicated when fewer than N")

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"load_format must be auto, safetensors or dummy, got {self.load_format!r}")
        if self.admission_policy not in _POLICIES:
            raise ValueError(f"admission_policy must be one of {_POLICIES}, got {self.admission_policy!r}")
        if not 0.0 <= self.admission_tail_overcommit <= 1.0:
            raise ValueError(f"admission_tail_overcommit must be in [0, 1], got {self.admission_tail_overcommit}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        mixed = self.max_mixed_graph_tokens
        if isinstance(mixed, bool) or not isinstance(mixed, int) or not 0 <= mixed <= MAX_MIXED_GRAPH_TOKENS:
            raise ValueError(f"max_mixed_graph_tokens must be an integer in [0, {MAX_MIXED_GRAPH_TOKENS}], "
                             f"got {mixed!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_prefill_tokens_per_seq"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None (sized by the device), got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.quantization not in _QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {_QUANTIZATIONS}, got {self.quantization!r}")
        if self.kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {_KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        parse_speculative_config(self.speculative_config)  # raises on unknown methods or keys

    @property
    def speculative(self) -> SpeculativeConfig | None:
        """`speculative_config` as a validated SpeculativeConfig (None: no speculation)."""
        return parse_speculative_config(self.speculative_config)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def settings_dict(self) -> dict[str, Any]:
        """Every setting's value, as plain data (what an executor reports)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


BIG_GPU_BYTES = 70 * 2**30
"""A GPU with this much memory (H100, H200 class) gets the larger default batch, as vLLM does."""
OFFLINE_BIG_GPU_TOKENS = 16384
"""The offline LLM class's token budget on a big GPU other than an A100: vLLM's LLM-class default
there (its server keeps 8192, as the executor does here: a step's length is the inter-token
latency of every stream it serves); vLLM leaves A100s at 8192, where the larger budget measured
slower (vLLM PR #17885)."""


def batch_limits(config: EngineConfig, device_memory_bytes: int | None, device_name: str = "",
                 offline: bool = False) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens): the configured values, else defaults for the
    device: 1024 sequences on a GPU with >= 70 GiB, 256 on smaller GPUs and on the CPU
    (device_memory_bytes None); a budget of 8192 tokens, 16384 for the offline LLM class
    (`offline`) on a GPU with >= 70 GiB that is not an A100."""
    big = device_memory_bytes is not None and device_memory_bytes >= BIG_GPU_BYTES
    seqs = config.max_num_seqs
    if seqs is None:
        seqs = 1024 if big else 256
    tokens = config.max_num_batched_tokens
    if tokens is None:
        tokens = OFFLINE_BIG_GPU_TOKENS if offline and big and "a100" not in device_name.lower() else 8192
    return seqs, tokens
