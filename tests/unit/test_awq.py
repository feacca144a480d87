"""taxiway's AWQ calibration on tiny random checkpoints: the dense calibration forward equals
HF transformers, folding scales keeps the float function, the search beats plain rounding where
activations have outlier channels, and both output formats load (ours, compressed-tensors'
decompression through transformers) and agree."""

from __future__ import annotations

import json

import pytest
import torch

from gpu_engine.config import ModelConfig
from gpu_engine.model import rope_cos_sin_cache
from gpu_engine.quant import awq as A
from gpu_engine.quant import awq_forward as AF
from gpu_engine.quant.int4 import fake_quantize_int4
from gpu_engine.quant.int4_checkpoint import load_dequantized, read_scheme
from gpu_engine.weights import build_model, load_checkpoint
from taxiway_kernels.testing import rel_err

transformers = pytest.importorskip("transformers")
from tests.tiny_models import make_tiny_checkpoint  # noqa: E402

GROUP = 32  # divides the tiny models' 64 / 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("awq")
    paths = {}
    for arch in ("llama", "qwen3"):
        make_tiny_checkpoint(arch, root / arch)
        paths[arch] = root / arch
    return paths


def _ours(path):
    cfg = ModelConfig.from_folder(path)
    model = build_model(cfg, torch.float32, torch.device("cpu"))
    load_checkpoint(model, path, cfg, progress=False)
    return model


def _ids(n=4, s=32, seed=0):
    return torch.randint(3, 320, (n, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dense_calibration_forward_equals_transformers(tiny, arch):
    ids = _ids()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny[arch], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
        ours = AF.dense_logits(_ours(tiny[arch]), ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_folded_scales_keep_the_float_layer(tiny):
    model = _ours(tiny["llama"])
    cfg = model.cfg
    layer = model.layers[0]
    stream = model.embed_tokens(_ids())
    cos_sin = rope_cos_sin_cache(cfg, 32, torch.device("cpu"))
    before = AF.run_layer(layer, stream, cos_sin).out
    g = torch.Generator().manual_seed(3)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    A._fold(layer.input_layernorm, None, torch.rand(h, generator=g) + 0.5, layer.qkv_proj)
    A._fold(layer.post_attention_layernorm, None, torch.rand(h, generator=g) + 0.5, layer.gate_up_proj)
    A._fold(layer.gate_up_proj, slice(inter, 2 * inter), torch.rand(inter, generator=g) + 0.5, layer.down_proj)
    torch.testing.assert_close(AF.run_layer(layer, stream, cos_sin).out, before, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_awq_beats_round_to_nearest_with_outlier_channels(tiny, tmp_path):
    """Give qkv's and gate_up's inputs a few large channels (what AWQ is for); its INT4 model then
    tracks the float logits better than plain group-wise rounding does."""
    src = tmp_path / "outliers"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32)
    for lyr in hf.model.layers:
        lyr.input_layernorm.weight[:4] *= 12
        lyr.post_attention_layernorm.weight[4:8] *= 12
    hf.save_pretrained(src)
    calib, evals = _ids(16, 32, seed=1), _ids(4, 32, seed=2)
    out = A.quantize_awq(src, tmp_path / "awq", group_size=GROUP, calib_ids=calib, num_samples=16,
                         seq_len=32, device="cpu", progress=False)
    ref = AF.dense_logits(_ours(src), evals)
    rtn = _ours(src)
    for layer in rtn.layers:
        for name in A._LINEARS:
            lin = getattr(layer, name)
            lin.weight.data = fake_quantize_int4(lin.weight.data, GROUP, True)
    err_awq = (AF.dense_logits(load_dequantized(out)[0], evals) - ref).pow(2).mean()
    err_rtn = (AF.dense_logits(rtn, evals) - ref).pow(2).mean()
    assert err_awq < 0.7 * err_rtn, (float(err_awq), float(err_rtn))


def _scheme(symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=GROUP))


def _linear_states(tensors: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, t in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf.startswith("weight_"):
            out.setdefault(prefix, {})[leaf] = t
    return out


def _dequantized_by_compressed_tensors(tensors: dict, symmetric: bool) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    return {prefix: PackedQuantizationCompressor.decompress(state, _scheme(symmetric))["weight"]
            for prefix, state in _linear_states(tensors).items()}


def _our_dequantized(folder) -> dict[str, torch.Tensor]:
    from gpu_engine.quant.int4_checkpoint import read_int4_checkpoint

    linears, _ = read_int4_checkpoint(folder, ModelConfig.from_folder(folder))
    return {prefix: wt.dequantize() for prefix, wt in linears.items()}


@pytest.mark.parametrize("zero_point,gptq", [(True, False), (False, False), (False, True)])
def test_compressed_tensors_output_against_compressed_tensors(tiny, tmp_path, zero_point, gptq):
    """Our pack-quantized output decompresses, through compressed-tensors' own compressor, to the
    weights our reader sees; its config validates as compressed-tensors'. Symmetric checkpoints
    also load in transformers and give our logits (transformers 5 with compressed-tensors 0.20
    cannot load asymmetric pack-quantized checkpoints from anyone: its skeleton keeps the zero
    point unpacked, [N, K // g] against the packed [N // 8, K // g] that the compressor writes).
    GPTQ rounding writes the same format."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    out = A.quantize_awq(tiny["qwen3"], tmp_path / "ct", group_size=GROUP, zero_point=zero_point,
                         calib_ids=_ids(8, 32), num_samples=8, seq_len=32, out_format="compressed-tensors",
                         device="cpu", progress=False, n_grid=4, gptq=gptq)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "pack-quantized"
    assert parsed.config_groups["group_0"].weights.symmetric is (not zero_point)
    scheme = read_scheme(out)
    assert (scheme.fmt, scheme.group_size, scheme.symmetric) == ("compressed-tensors", GROUP, not zero_point)
    theirs = _dequantized_by_compressed_tensors(load_file(str(out / "model.safetensors")), not zero_point)
    ours = _our_dequantized(out)
    assert set(theirs) == set(ours) and len(ours) == 2 * 7
    for prefix, w in ours.items():
        torch.testing.assert_close(w.to(theirs[prefix].dtype), theirs[prefix], rtol=0, atol=0)
    if zero_point:
        return
    ids = _ids(2, 16, seed=5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(AF.dense_logits(load_dequantized(out)[0], ids), hf(ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("zero_point,gptq", [(True, False), (False, False), (True, True)])
def test_autoawq_output_against_compressed_tensors_converter(tiny, tmp_path, zero_point, gptq):
    """compressed-tensors' AutoAWQ converter reads our AutoAWQ output as we do, symmetric included
    (codes offset by 8; its converter ignores qzeros then, vLLM's awq reads our qzeros of 8), GPTQ
    rounding included."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
    from safetensors.torch import load_file

    kw = dict(group_size=GROUP, zero_point=zero_point, calib_ids=_ids(8, 32), num_samples=8, seq_len=32,
              device="cpu", progress=False, n_grid=4, clip=False, gptq=gptq)
    awq_dir = A.quantize_awq(tiny["llama"], tmp_path / "awq", **kw)
    qc = json.loads((awq_dir / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": zero_point,
                  "version": "gemm", "modules_to_not_convert": None}
    converter = AutoAWQConverter.from_autoawq_config(qc)
    converted = converter.process(load_file(str(awq_dir / "model.safetensors")))
    theirs = _dequantized_by_compressed_tensors(converted, not zero_point)
    ours = _our_dequantized(awq_dir)
    assert set(theirs) == set(ours) and len(ours) == 2 * 7
    for prefix, w in ours.items():
        torch.testing.assert_close(w.to(theirs[prefix].dtype), theirs[prefix], rtol=0, atol=0)
    ct_dir = A.quantize_awq(tiny["llama"], tmp_path / "ct", out_format="compressed-tensors", **kw)
    for prefix, w in _our_dequantized(ct_dir).items():  # the same codes; AutoAWQ's scales are float16
        assert torch.equal(w.ne(0), ours[prefix].ne(0)), prefix
        assert rel_err(ours[prefix], w) < 1e-3, prefix


def test_quantize_awq_rejects_bad_settings(tiny, tmp_path):
    with pytest.raises(ValueError, match="group_size 128 does not divide hidden_size 64; group_size 64 divides"):
        A.quantize_awq(tiny["llama"], tmp_path / "x", group_size=128, calib_ids=_ids(), device="cpu")
    with pytest.raises(ValueError, match="out_format must be one of"):
        A.quantize_awq(tiny["llama"], tmp_path / "x", out_format="gguf")
    with pytest.raises(ValueError, match="fewer than num_samples \\* seq_len = 4096"):
        A.quantize_awq(tiny["llama"], tmp_path / "x", group_size=GROUP, calib_ids=_ids(), num_samples=16,
                       seq_len=256, device="cpu")
    with pytest.raises(ValueError, match="n_grid must be positive"):
        A.AwqSettings(n_grid=0)
    with pytest.raises(ValueError, match="gptq_act_order needs gptq_static_groups=True"):
        A.AwqSettings(gptq_static_groups=False)
    with pytest.raises(ValueError, match="gptq_damp must be positive, got 0"):
        A.AwqSettings(gptq_damp=0)
