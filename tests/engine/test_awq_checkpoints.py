"""The INT4 AWQ linear method in the engine (CPU): checkpoints AutoAWQ wrote (tests/data), and ours
in both layouts (AutoAWQ GEMM, compressed-tensors pack-quantized), symmetric and asymmetric, in
groups of 32 / 64 / 128, load without a flag and give the logprobs of the same model with its
weights dequantized; fused q|k|v and gate|up keep each part's codes, scales and zero points
exactly; dummy INT4 weights build and generate; bad checkpoints and contradicting flags are
errors that name the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpu_engine.config import ModelConfig
from gpu_engine.errors import ModelLoadError
from gpu_engine.quant import awq as A
from gpu_engine.quant import awq_forward as AF
from gpu_engine.quant.awq_export import linear_parts, write_checkpoint
from gpu_engine.quant.awq_method import AwqLinear
from gpu_engine.quant.int4 import quantize_int4
from gpu_engine.quant.int4_checkpoint import load_dequantized, read_int4_checkpoint
from gpu_engine.quant.int4_linear import Int4Linear
from gpu_engine.quant.linear import stored_bytes
from gpu_engine.weights import build_model, load_checkpoint
from taxiway import LLM, SamplingParams
from taxiway_kernels.w4a16_reference import dequantize_w4a16
from tests.engine.test_fp8_checkpoints import prompt_logprobs

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).resolve().parent.parent / "data"
AUTOAWQ = DATA / "tiny-llama-autoawq"  # written by AutoAWQ itself (tests/data/make_autoawq_fixture.py)
PROMPTS = [[5, 17, 99, 3, 250, 41, 7, 7, 100, 12, 8, 200], [300, 2, 9, 88, 61, 14, 150, 151]]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A tiny random Llama whose linears' inputs (128, 256) every group size divides; k_proj's
    weights 10x larger than q's and v's, so the fused parts' scales differ."""
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.8 if "k_proj" in name else 0.08)
    folder = tmp_path_factory.mktemp("wide") / "llama"
    model.save_pretrained(folder)
    return folder


def rtn_checkpoint(src: Path, out: Path, fmt: str, group: int | None, zero_point: bool) -> Path:
    """src rounded to INT4 (no calibration), written by our exporter in `fmt`; group None: one
    group per row (config.json then says so as each tool does: group_size -1 / strategy channel)."""
    cfg = ModelConfig.from_folder(src)
    model = build_model(cfg, torch.float32, torch.device("cpu"))
    load_checkpoint(model, src, cfg, progress=False)
    quantized = [{name: quantize_int4(w := getattr(layer, name).weight, group or w.shape[1], zero_point)
                  for name in A._LINEARS} for layer in model.layers]
    write_checkpoint(model, cfg, quantized, src, out, fmt=fmt, group_size=group or 128, zero_point=zero_point)
    if group is None:
        config = json.loads((out / "config.json").read_text())
        qc = config["quantization_config"]
        if fmt == "autoawq":
            qc["group_size"] = -1
        else:
            qc["config_groups"]["group_0"]["weights"].update(strategy="channel", group_size=None)
        (out / "config.json").write_text(json.dumps(config))
    return out


def reference_logprobs(folder: Path, prompts: list[list[int]]) -> torch.Tensor:
    """The same flattening as prompt_logprobs, from our dense forward of the dequantized weights."""
    model, _ = load_dequantized(folder)
    out = []
    with torch.no_grad():
        for p in prompts:
            lps = torch.log_softmax(AF.dense_logits(model, torch.tensor([p]))[0].double(), -1)
            out.append(lps[:-1].gather(-1, torch.tensor(p[1:])[:, None])[:, 0])
    return torch.cat(out)


def test_autoawq_checkpoint_loads_without_flag_and_matches_autoawq():
    llm = LLM(str(AUTOAWQ), device="cpu", num_kv_blocks=64)
    spec = llm.engine.quant_spec
    assert (spec.method, spec.source, spec.weights.group_size) == ("awq", "awq", 64)
    layer = llm.engine.runner.model.layers[0]
    assert all(isinstance(getattr(layer, n), AwqLinear) for n in A._LINEARS)
    ref = load_file(str(AUTOAWQ.parent / "tiny-llama-autoawq.reference.safetensors"))
    ids = ref["input_ids"]
    theirs = torch.log_softmax(ref["logits"].double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].flatten()
    got = prompt_logprobs(llm, ids.tolist())
    assert (got - theirs).abs().max() < 5e-3  # AutoAWQ ran in float16, we in float32: measured 3e-4
    assert (got - reference_logprobs(AUTOAWQ, ids.tolist())).abs().max() < 1e-4
    out = llm.generate([[1, 17, 42]], GREEDY)[0].outputs[0]
    assert len(out.token_ids) == 8


@pytest.mark.parametrize("fmt,group,zero_point", [
    ("autoawq", 128, True), ("autoawq", 32, False), ("compressed-tensors", 64, True),
    ("compressed-tensors", 128, False), ("compressed-tensors", 32, True),
    ("autoawq", None, True), ("compressed-tensors", None, False),  # per channel: K 128 and 256
])
def test_our_int4_checkpoints_load_and_match_their_dequantized_weights(wide, tmp_path, fmt, group, zero_point):
    folder = rtn_checkpoint(wide, tmp_path / "q", fmt, group, zero_point)
    llm = LLM(str(folder), device="cpu", num_kv_blocks=64)
    spec = llm.engine.quant_spec
    assert spec.method == "awq" and spec.weights.group_size == group and spec.weights.symmetric is (not zero_point)
    layer = llm.engine.runner.model.layers[1]
    assert layer.qkv_proj.group_size == (group or 128) and (layer.qkv_proj.zeros is None) is (not zero_point)
    assert layer.down_proj.group_size == (group or 128)  # per channel over K 256: two groups of 128
    got = prompt_logprobs(llm, PROMPTS)
    torch.testing.assert_close(got, reference_logprobs(folder, PROMPTS), rtol=0, atol=1e-4)
    assert len(llm.generate(PROMPTS, GREEDY)[1].outputs[0].token_ids) == 8


@pytest.mark.parametrize("fmt", ["autoawq", "compressed-tensors"])
def test_fused_parts_keep_their_codes_scales_and_zero_points(wide, tmp_path, fmt):
    folder = rtn_checkpoint(wide, tmp_path / "q", fmt, 64, True)
    cfg = ModelConfig.from_folder(folder)
    parts, _ = read_int4_checkpoint(folder, cfg)
    layers = LLM(str(folder), device="cpu", num_kv_blocks=64).engine.runner.model.layers
    for i, layer in enumerate(layers):
        for ours, hf_parts in linear_parts(cfg).items():
            lin = getattr(layer, ours)
            want = [parts[f"model.layers.{i}.{hf}"] for hf, _, _ in hf_parts]
            assert torch.equal(lin.scales, torch.cat([w.scales.float() for w in want]))
            assert torch.equal(lin.zeros, torch.cat([w.zeros for w in want]))
            assert torch.equal(dequantize_w4a16(lin.weight4()), torch.cat([w.dequantize() for w in want]))
    q, k = (parts[f"model.layers.0.self_attn.{n}_proj"].scales.mean() for n in "qk")
    assert k > 5 * q  # the parts' scales differ as the weights do
    assert stored_bytes(layers[0].qkv_proj) == sum(b.numel() * b.element_size() for b in layers[0].qkv_proj.buffers())


def test_calibrated_checkpoint_from_the_quantize_command(tiny_llama, tmp_path):
    """`taxiway quantize --method awq` (a few windows of random tokens) writes a checkpoint that
    loads with no flag, matches its dequantized weights and generates."""
    from taxiway.cli import main

    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a word tokenizer: t0 .. t319
        shutil.copy(DATA / "tiny-llama-fp8-dynamic" / name, src / name)
    words = torch.randint(3, 320, (1200,), generator=torch.Generator().manual_seed(0)).tolist()
    (tmp_path / "calib.txt").write_text(" ".join(f"t{w}" for w in words))
    out = tmp_path / "awq"
    rc = main(["quantize", "--method", "awq", "--model", str(src), "--out", str(out), "--device", "cpu",
               "--calibration-text", str(tmp_path / "calib.txt"), "--num-samples", "4", "--seq-len", "64",
               "--group-size", "32", "--format", "compressed-tensors"])
    assert rc == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    llm = LLM(str(out), device="cpu", num_kv_blocks=64)
    assert llm.engine.quant_spec.source == "compressed-tensors"
    torch.testing.assert_close(prompt_logprobs(llm, PROMPTS), reference_logprobs(out, PROMPTS), rtol=0, atol=1e-4)
    base = prompt_logprobs(LLM(tiny_llama, device="cpu", num_kv_blocks=64), PROMPTS)
    assert 0 < (prompt_logprobs(llm, PROMPTS) - base).abs().mean() < 0.5
    assert len(llm.generate(["t5 t17 t99"], GREEDY)[0].outputs[0].token_ids) == 8


def test_quantize_command_refuses_a_quantized_source(tmp_path):
    from taxiway.cli import main

    rc = main(["quantize", "--method", "awq", "--model", str(AUTOAWQ), "--out", str(tmp_path / "x")])
    assert rc == 1 and not (tmp_path / "x").exists()


def test_dummy_awq_builds_int4_linears_and_generates(tiny_llama):
    llm = LLM(tiny_llama, device="cpu", load_format="dummy", quantization="awq", num_kv_blocks=64)
    spec = llm.engine.quant_spec
    assert (spec.method, spec.source) == ("awq", "dummy")
    layer = llm.engine.runner.model.layers[0]
    assert isinstance(layer.gate_up_proj, Int4Linear) and layer.gate_up_proj.qweight.dtype == torch.int32
    assert layer.gate_up_proj.group_size == 64 and layer.down_proj.group_size == 128  # K 64 and 128
    assert layer.qkv_proj.qweight.unique().numel() > 100
    outs = llm.generate(PROMPTS, GREEDY)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)


def test_awq_with_fp8_kv_cache(wide, tmp_path):
    folder = rtn_checkpoint(wide, tmp_path / "q", "autoawq", 128, True)
    base = prompt_logprobs(LLM(str(folder), device="cpu", num_kv_blocks=64), PROMPTS)
    llm = LLM(str(folder), device="cpu", kv_cache_dtype="fp8", num_kv_blocks=64)
    assert llm.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    got = prompt_logprobs(llm, PROMPTS)
    assert 0 < (got - base).abs().max() < 0.5


def test_flags_against_the_checkpoint():
    assert LLM(str(AUTOAWQ), device="cpu", quantization="awq", num_kv_blocks=64).engine.quant_spec.source == "awq"
    with pytest.raises(ModelLoadError, match="quantization='fp8' contradicts the checkpoint, which is awq"):
        LLM(str(AUTOAWQ), device="cpu", quantization="fp8", num_kv_blocks=64)


def _edited(tmp_path: Path, config: dict | None = None, drop: tuple[str, ...] = (),
            add: dict[str, torch.Tensor] | None = None) -> str:
    folder = tmp_path / "m"
    shutil.copytree(AUTOAWQ, folder)
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"].update(config)
        (folder / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(folder / "model.safetensors"))
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    save_file(tensors, str(folder / "model.safetensors"))
    return str(folder)


@pytest.mark.parametrize("edit,match", [
    (dict(config={"version": "gemv"}), "version = 'gemv' is not supported"),
    (dict(config={"bits": 8}), "bits = 8 is not supported"),
    (dict(config={"group_size": 48}), "group_size 48 does not divide"),
    (dict(config={"zero_point": False}), "qzeros holds zero points other than 8 but config.json says zero_point"),
    (dict(drop=("model.layers.1.mlp.up_proj.qzeros",)),
     r"model\.layers\.1\.mlp\.up_proj\.qzeros \(int32 \[2, rows / 8\]\)"),
    (dict(add={"model.layers.0.self_attn.q_proj.g_idx": torch.zeros(128, dtype=torch.int32)}),
     r"act-order \(g_idx\)"),
    (dict(add={"model.layers.0.mlp.down_proj.weight": torch.zeros(128, 256)}), "a 16-bit weight in an INT4"),
])
def test_bad_checkpoints_are_named(tmp_path, edit, match):
    with pytest.raises(ModelLoadError, match=match):
        LLM(_edited(tmp_path, **edit), device="cpu", num_kv_blocks=64)


def test_wrong_shape_names_the_tensor(tmp_path):
    t = load_file(str(AUTOAWQ / "model.safetensors"))["model.layers.0.self_attn.k_proj.scales"]
    folder = _edited(tmp_path, add={"model.layers.0.self_attn.k_proj.scales": t[:, :8].contiguous()})
    with pytest.raises(ModelLoadError, match=r"k_proj\.scales has shape \(2, 8\), expected \(2, 64\)"):
        LLM(folder, device="cpu", num_kv_blocks=64)


def test_modules_left_unquantized_load_as_16_bit(tmp_path):
    """AutoAWQ's modules_to_not_convert: that module's dense weight loads into a plain linear."""
    down = "model.layers.1.mlp.down_proj"
    cfg = ModelConfig.from_folder(AUTOAWQ)
    dense = read_int4_checkpoint(AUTOAWQ, cfg)[0][down].dequantize(torch.float16)
    folder = _edited(tmp_path, config={"modules_to_not_convert": [down]},
                     drop=tuple(f"{down}.{leaf}" for leaf in ("qweight", "qzeros", "scales")),
                     add={f"{down}.weight": dense})
    llm = LLM(folder, device="cpu", num_kv_blocks=64)
    layers = llm.engine.runner.model.layers
    assert isinstance(layers[0].down_proj, AwqLinear) and not isinstance(layers[1].down_proj, Int4Linear)
    prompts = [[p % 256 for p in prompt] for prompt in PROMPTS]  # the fixture's vocabulary: 256
    want = prompt_logprobs(LLM(str(AUTOAWQ), device="cpu", num_kv_blocks=64), prompts)
    torch.testing.assert_close(prompt_logprobs(llm, prompts), want, rtol=0, atol=1e-4)  # weight rounded to float16
