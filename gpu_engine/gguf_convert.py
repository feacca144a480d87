"""Convert a llama-architecture GGUF file into a Hugging Face folder.

The output is what `transformers` saves for a `LlamaForCausalLM`: config.json, model.safetensors
(float32, the exact dequantized values), tokenizer.json, tokenizer_config.json and
generation_config.json. Only what the default model needs is supported: architecture `llama`,
a byte-level BPE vocabulary (`tokenizer.ggml.model == "gpt2"`) and the pre-tokenizers listed in
`_PRE_TOKENIZERS`; anything else raises `ModelLoadError` instead of producing a wrong model.

    convert_gguf(Path("model.gguf"), Path("out/"), progress=True)
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gpu_engine.errors import ModelLoadError

_MISSING = object()

# llama.cpp tensor names -> HF names ("{}" is the layer index).
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# llama.cpp token types (gguf.TokenType).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def convert_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
    """Write the HF-layout files for `gguf_path` into the existing folder `out_dir`."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    meta = _Metadata(reader)
    config = llama_config(meta)
    weights = _weight_plan(reader, config)
    config["tie_word_embeddings"] = "lm_head.weight" not in {w.name for w in weights}
    bar = tqdm(total=len(weights) + 1, desc=f"Converting {gguf_path.name}", unit="tensor", disable=not progress)
    with bar:
        _write_safetensors(weights, out_dir / "model.safetensors", bar.update)
        build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
        bar.update(1)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(meta, config))
    _write_json(out_dir / "generation_config.json", _generation_config(config))


class _Metadata:
    """Typed access to a GGUF file's key/value metadata."""

    def __init__(self, reader: Any) -> None:
        self._reader = reader

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self._reader.get_field(key)
        if field is None:
            if default is _MISSING:
                raise ModelLoadError(f"GGUF file lacks the metadata key {key!r}")
            return default
        return field.contents()


def _f32_decimal(value: float) -> float:
    """The shortest decimal that round-trips a float32 value (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(str(np.float32(value)))


def llama_config(meta: _Metadata) -> dict[str, Any]:
    """An HF `LlamaForCausalLM` config.json from the GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported; only 'llama' is")
    if meta.get("llama.rope.scaling.type", "none") not in ("none", None):
        raise ModelLoadError("GGUF files with rope scaling are not supported")
    hidden = int(meta.get("llama.embedding_length"))
    heads = int(meta.get("llama.attention.head_count"))
    head_dim = int(meta.get("llama.rope.dimension_count", hidden // heads))
    if head_dim * heads != hidden:
        raise ModelLoadError(f"head_dim {head_dim} * {heads} heads != hidden size {hidden}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta.get("llama.feed_forward_length")),
        "num_hidden_layers": int(meta.get("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.get("llama.context_length")),
        "rms_norm_eps": _f32_decimal(meta.get("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32_decimal(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "vocab_size": len(meta.get("tokenizer.ggml.tokens")),
        "bos_token_id": _int_or_none(meta.get("tokenizer.ggml.bos_token_id", None)),
        "eos_token_id": _int_or_none(meta.get("tokenizer.ggml.eos_token_id", None)),
        "pad_token_id": _int_or_none(meta.get("tokenizer.ggml.padding_token_id", None)),
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _weight_plan(reader: Any, config: dict[str, Any]) -> list[_Weight]:
    """One entry per GGUF tensor: HF name, HF shape and how to produce its float32 values."""
    return [_Weight(_hf_name(t.name), tuple(int(d) for d in reversed(t.shape)), t, config) for t in reader.tensors]


class _Weight:
    """A GGUF tensor under its HF name. GGUF lists dimensions innermost first, so `shape` is reversed."""

    def __init__(self, name: str, shape: tuple[int, ...], tensor: Any, config: dict[str, Any]) -> None:
        self.name, self.shape, self._tensor = name, shape, tensor
        self._heads = (config["num_attention_heads"] if name.endswith("q_proj.weight") else
                       config["num_key_value_heads"] if name.endswith("k_proj.weight") else None)

    def values(self) -> np.ndarray:
        """The dequantized values, float32, with llama.cpp's Q/K row permutation undone."""
        from gguf.quants import dequantize

        values = np.asarray(dequantize(self._tensor.data, self._tensor.tensor_type), dtype=np.float32)
        values = values.reshape(self.shape)
        return values if self._heads is None else unpermute_rotary(values, self._heads)


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS and parts[3] == "weight":
        return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}.weight"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no known Hugging Face name")


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a Q or K projection.

    llama.cpp's converter reorders each head's rows from HF's rotate-half layout (first half, second
    half) to interleaved pairs; this puts them back. `weight` is [num_heads * head_dim, in_features].
    """
    rows, cols = weight.shape
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _write_safetensors(weights: list[_Weight], path: Path, step: Callable[[int], Any]) -> None:
    """Write a float32 safetensors file one tensor at a time (peak memory: one tensor, not the model)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for weight in weights:
        size = 4 * math.prod(weight.shape)
        header[weight.name] = {"dtype": "F32", "shape": list(weight.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the safetensors library does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for weight in weights:
            f.write(np.ascontiguousarray(weight.values(), dtype="<f4").tobytes())
            step(1)


def _byte_level_pre_tokenizer(digits: bool) -> Any:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if not digits:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


# tokenizer.ggml.pre -> the HF pre-tokenizer that splits text as llama.cpp does for that name.
# "smollm" (llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM): every \p{N} on its own, then the GPT-2 regex;
# that is HF's Digits(individual_digits=True) followed by ByteLevel(use_regex=True).
_PRE_TOKENIZERS: dict[str, Callable[[], Any]] = {
    "smollm": lambda: _byte_level_pre_tokenizer(digits=True),
    "starcoder": lambda: _byte_level_pre_tokenizer(digits=True),
    "gpt-2": lambda: _byte_level_pre_tokenizer(digits=False),
}


def build_tokenizer(meta: _Metadata) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF vocabulary, merges and token types."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt-2")
    if kind != "gpt2":
        raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2')")
    if pre not in _PRE_TOKENIZERS:
        raise ModelLoadError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(_PRE_TOKENIZERS)}")
    tokens = list(meta.get("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(types) != len(tokens):
        raise ModelLoadError("GGUF vocabulary has duplicate tokens or a token_type list of another length")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tok.post_processor = _post_processor(meta, tokens)
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>...) are special; user-defined ones are matched whole but kept in decode.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind_ in zip(tokens, types, strict=True) if kind_ == _TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind_ in zip(tokens, types, strict=True) if kind_ == _TOKEN_USER_DEFINED])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ModelLoadError("added tokens changed the vocabulary size; the GGUF token types are inconsistent")
    return tok


def _post_processor(meta: _Metadata, tokens: list[str]) -> Any:
    """ByteLevel (adds nothing), plus the BOS token in front when the file asks for it."""
    from tokenizers import processors

    byte_level = processors.ByteLevel(trim_offsets=False)
    bos = meta.get("tokenizer.ggml.bos_token_id", None)
    if not meta.get("tokenizer.ggml.add_bos_token", False) or bos is None:
        return byte_level
    bos_text = tokens[int(bos)]
    template = processors.TemplateProcessing(
        single=f"{bos_text} $A", pair=f"{bos_text} $A {bos_text} $B", special_tokens=[(bos_text, int(bos))])
    return processors.Sequence([byte_level, template])


def _token(meta: _Metadata, key: str) -> str | None:
    index = meta.get(key, None)
    return None if index is None else str(meta.get("tokenizer.ggml.tokens")[int(index)])


def _tokenizer_config(meta: _Metadata, config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": _token(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token": _token(meta, "tokenizer.ggml.eos_token_id"),
        "pad_token": _token(meta, "tokenizer.ggml.padding_token_id"),
        "unk_token": _token(meta, "tokenizer.ggml.unknown_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = meta.get("tokenizer.chat_template", None)
    if template is not None:
        out["chat_template"] = str(template)
    return out


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: config[key] for key in keys if config[key] is not None}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
