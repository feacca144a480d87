"""`taxiway quantize --method fp8`: its compressed-tensors output loads in HF transformers (with
compressed-tensors) and in taxiway, and the two agree; static and KV scales come from calibration,
and so does GPTQ rounding of the weights (--gptq)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taxiway import LLM
from taxiway.cli import main
from tests.engine.test_fp8_checkpoints import prompt_logprobs

DATA = Path(__file__).resolve().parent.parent / "data"
PROMPTS = [[5, 17, 99, 3, 250, 41, 7, 7, 100, 12, 8, 200], [300, 2, 9, 88, 61, 14, 150, 151]]


@pytest.fixture(scope="module")
def source(tiny_llama, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny Llama with a word tokenizer (t0 .. t319), and a calibration text in those words."""
    folder = tmp_path_factory.mktemp("src") / "llama"
    shutil.copytree(tiny_llama, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DATA / "tiny-llama-fp8-dynamic" / name, folder / name)
    words = torch.randint(3, 320, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    text = folder.parent / "calib.txt"
    text.write_text(" ".join(f"t{w}" for w in words))
    return folder, text


def quantize(src: Path, text: Path, out: Path, *flags: str) -> Path:
    rc = main(["quantize", "--method", "fp8", "--model", str(src), "--out", str(out), "--device", "cpu",
               "--calibration-text", str(text), "--num-samples", "8", "--seq-len", "64", *flags])
    assert rc == 0
    return out


def hf_logprobs(folder: Path, prompts: list[list[int]]) -> torch.Tensor:
    pytest.importorskip("compressed_tensors")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            lps = torch.log_softmax(model(torch.tensor([p])).logits[0].double(), -1)
            out += [float(lps[j - 1, p[j]]) for j in range(1, len(p))]
    return torch.tensor(out, dtype=torch.float64)


def test_dynamic_export_loads_in_hf_and_equals_online_fp8(source, tmp_path):
    src, text = source
    out = quantize(src, text, tmp_path / "dyn")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "float-quantized" and qcfg["kv_cache_scheme"] is None
    assert qcfg["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
    ours = prompt_logprobs(LLM(str(out), device="cpu", num_kv_blocks=64), PROMPTS)
    online = prompt_logprobs(LLM(str(src), device="cpu", quantization="fp8", num_kv_blocks=64), PROMPTS)
    assert torch.equal(ours, online), "the export holds exactly what online FP8 computes at load"
    assert (ours - hf_logprobs(out, PROMPTS)).abs().max() < 1e-4


def test_static_and_kv_scales_from_calibration(source, tmp_path):
    src, text = source
    out = quantize(src, text, tmp_path / "static", "--static-activations", "--kv-cache")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["config_groups"]["group_0"]["input_activations"]["strategy"] == "tensor"
    assert qcfg["kv_cache_scheme"]["strategy"] == "tensor"
    tensors = load_file(str(out / "model.safetensors"))
    q, k = (tensors[f"model.layers.0.self_attn.{n}_proj.input_scale"] for n in "qk")
    assert q.shape == (1,) and torch.equal(q, k), "q/k/v share their input, so their static scale"
    assert tensors["model.layers.1.self_attn.k_scale"].item() > 0
    base = prompt_logprobs(LLM(str(src), device="cpu", num_kv_blocks=64), PROMPTS)
    auto = prompt_logprobs(LLM(str(out), device="cpu", num_kv_blocks=64), PROMPTS)
    # HF transformers applies the static input scales but not the KV scales: compare without FP8 KV.
    assert (auto - hf_logprobs(out, PROMPTS)).abs().max() < 1e-4
    llm = LLM(str(out), device="cpu", kv_cache_dtype="fp8", num_kv_blocks=64)
    layer = llm.engine.runner.model.layers[1]
    assert layer.kv_scale == (tensors["model.layers.1.self_attn.k_scale"].item(),
                              tensors["model.layers.1.self_attn.v_scale"].item())
    fp8_kv = prompt_logprobs(llm, PROMPTS)
    assert (fp8_kv - base).abs().mean() < 0.05 and (auto - base).abs().mean() < 0.05


def test_quantize_refuses_a_quantized_checkpoint(tmp_path, capsys):
    rc = main(["quantize", "--method", "fp8", "--model", str(DATA / "tiny-llama-fp8-dynamic"),
               "--out", str(tmp_path / "x")])
    assert rc == 1 and "already quantized" in capsys.readouterr().err


def test_gptq_weights_keep_the_format_and_load(source, tmp_path):
    """--gptq: the same per-channel weight scales as rounding to nearest (the format is unchanged),
    other FP8 values, and it loads in taxiway and transformers alike. (On this random tiny model
    it does not track the float model more closely than rounding to nearest: bench/quality.py
    measures that on the default model.)"""
    src, text = source
    rtn, gptq = quantize(src, text, tmp_path / "rtn"), quantize(src, text, tmp_path / "gptq", "--gptq")
    assert json.loads((gptq / "config.json").read_text()) == json.loads((rtn / "config.json").read_text())
    a, b = load_file(str(rtn / "model.safetensors")), load_file(str(gptq / "model.safetensors"))
    assert set(a) == set(b)
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(a[name + ".weight_scale"], b[name + ".weight_scale"])
    assert b[name + ".weight"].dtype == torch.float8_e4m3fn and not torch.equal(
        a[name + ".weight"].view(torch.uint8), b[name + ".weight"].view(torch.uint8))
    ours = prompt_logprobs(LLM(str(gptq), device="cpu", num_kv_blocks=64), PROMPTS)
    assert (ours - hf_logprobs(gptq, PROMPTS)).abs().max() < 1e-4
