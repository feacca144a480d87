"""INT4 layouts against the tools that write them: compressed-tensors' own compressor (in the test
extra) and a checkpoint AutoAWQ itself wrote (tests/data/tiny-llama-autoawq, made by
tests/data/make_autoawq_fixture.py), plus the kernel layout and round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpu_engine.quant import int4
from gpu_engine.quant.int4 import Int4FormatError, Int4Weight
from taxiway_kernels.w4a16_reference import dequantize_w4a16, pack_int4_k, unpack_int4_k

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "tiny-llama-autoawq"


def _random_int4(n: int, k: int, g: int, symmetric: bool, seed: int = 0) -> Int4Weight:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // g, generator=gen) * 0.1 + 0.01
    zeros = None if symmetric else torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8)
    return Int4Weight(codes, scales, zeros, g)


def test_kernel_packing_round_trip_and_bit_order():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 2)  # [3, 32]
    packed = pack_int4_k(codes)
    assert packed.shape == (3, 4) and packed.dtype == torch.int32
    # word 0 holds codes 0..7: nibble j = j, so 0x76543210; word 1 holds 8..15 (top bit set)
    assert int(packed[0, 0]) == 0x76543210
    assert int(packed[0, 1]) == 0xFEDCBA98 - 2**32
    assert torch.equal(unpack_int4_k(packed), codes)
    with pytest.raises(ValueError, match="0..15"):
        pack_int4_k(torch.full((1, 8), 16))


def test_kernel_packing_equals_compressed_tensors_pack_to_int32():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    gen = torch.Generator().manual_seed(3)
    signed = torch.randint(-8, 8, (24, 96), generator=gen, dtype=torch.int8)
    theirs = helpers.pack_to_int32(signed, 4)
    ours = pack_int4_k((signed.to(torch.int16) + 8).to(torch.uint8))
    assert torch.equal(theirs, ours)
    assert torch.equal(helpers.unpack_from_int32(theirs, 4, signed.shape), signed)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, None])
def test_compressed_tensors_layout_against_its_compressor(symmetric, group_size):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    n, k = 16, 64
    g = k if group_size is None else group_size
    strategy = "channel" if group_size is None else "group"
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy=strategy, group_size=group_size))
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=gen)
    scale = torch.rand(n, k // g, generator=gen) * 0.2 + 0.05
    state = {"weight": w, "weight_scale": scale}
    if not symmetric:
        state["weight_zero_point"] = torch.randint(-8, 8, (n, k // g), generator=gen, dtype=torch.int8)
    packed = PackedQuantizationCompressor.compress(state, scheme)
    ours = int4.from_compressed_tensors(
        packed["weight_packed"], packed["weight_scale"], packed.get("weight_zero_point"),
        packed["weight_shape"], in_features=k, out_features=n, group_size=group_size,
        symmetric=symmetric)
    theirs = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    torch.testing.assert_close(ours.dequantize(), theirs, rtol=0, atol=0)
    again = int4.to_compressed_tensors(ours, torch.float32)
    assert set(again) == set(packed)
    for name, t in packed.items():
        assert torch.equal(again[name], t), name


def _fixture_linears() -> dict[str, dict[str, torch.Tensor]]:
    tensors = load_file(str(FIXTURE / "model.safetensors"))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf in ("qweight", "qzeros", "scales"):
            out.setdefault(prefix, {})[leaf] = t
    return out


def test_autoawq_checkpoint_unpacks_to_autoawqs_own_dequantized_weights():
    cfg = json.loads((FIXTURE / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["version"], qc["bits"], qc["zero_point"]) == ("awq", "gemm", 4, True)
    ref = load_file(str(FIXTURE.parent / "tiny-llama-autoawq.reference.safetensors"))
    linears = _fixture_linears()
    assert len(linears) == 2 * 7
    for prefix, t in linears.items():
        k, n = t["qweight"].shape[0], t["scales"].shape[1]
        wt = int4.from_autoawq(t["qweight"], t["qzeros"], t["scales"], in_features=k, out_features=n,
                               group_size=qc["group_size"], zero_point=True, name=prefix)
        theirs = ref[f"{prefix}.dequantized"]  # [K, N] float16
        assert torch.equal(wt.dequantize(torch.float16).t(), theirs), prefix
        repacked = int4.to_autoawq(wt)
        for leaf in ("qweight", "qzeros", "scales"):
            assert torch.equal(repacked[leaf], t[leaf]), f"{prefix}.{leaf}"


def test_autoawq_checkpoint_logits_match_autoawq_with_our_dequantized_weights():
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((FIXTURE / "config.json").read_text())
    cfg.pop("quantization_config")
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    tensors = load_file(str(FIXTURE / "model.safetensors"))
    state = {k: v.float() for k, v in tensors.items() if not k.endswith(("qweight", "qzeros", "scales"))}
    for prefix, t in _fixture_linears().items():
        k, n = t["qweight"].shape[0], t["scales"].shape[1]
        wt = int4.from_autoawq(t["qweight"], t["qzeros"], t["scales"], in_features=k, out_features=n,
                               group_size=64, zero_point=True, name=prefix)
        state[f"{prefix}.weight"] = wt.dequantize(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ref = load_file(str(FIXTURE.parent / "tiny-llama-autoawq.reference.safetensors"))
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    # AutoAWQ ran in float16, we in float32: agreement to float16 rounding
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=2e-2)


def test_autoawq_round_trip_symmetric_writes_qzeros_of_eight():
    wt = _random_int4(16, 128, 64, symmetric=True)
    packed = int4.to_autoawq(wt)
    assert bool((int4._awq_unpack(packed["qzeros"]) == 8).all())
    back = int4.from_autoawq(packed["qweight"], packed["qzeros"], packed["scales"], in_features=128,
                             out_features=16, group_size=64, zero_point=False)
    assert back.zeros is None and torch.equal(back.codes, wt.codes)
    no_zeros = int4.from_autoawq(packed["qweight"], None, packed["scales"], in_features=128,
                                 out_features=16, group_size=64, zero_point=False)
    assert torch.equal(no_zeros.dequantize(), back.dequantize())


def test_autoawq_errors_name_the_tensor_and_the_expectation():
    wt = _random_int4(16, 128, 64, symmetric=False)
    p = int4.to_autoawq(wt)
    kw = dict(in_features=128, out_features=16, group_size=64, name="model.layers.0.mlp.up_proj")
    with pytest.raises(Int4FormatError, match=r"up_proj\.qzeros is missing"):
        int4.from_autoawq(p["qweight"], None, p["scales"], zero_point=True, **kw)
    with pytest.raises(Int4FormatError, match=r"up_proj\.qweight has shape \(128, 1\), expected \(128, 2\)"):
        int4.from_autoawq(p["qweight"][:, :1], p["qzeros"], p["scales"], zero_point=True, **kw)
    with pytest.raises(Int4FormatError, match=r"up_proj\.qweight has dtype torch\.int64"):
        int4.from_autoawq(p["qweight"].long(), p["qzeros"], p["scales"], zero_point=True, **kw)
    with pytest.raises(Int4FormatError, match=r"up_proj\.scales is missing"):
        int4.from_autoawq(p["qweight"], p["qzeros"], None, zero_point=True, **kw)
    with pytest.raises(Int4FormatError, match="zero points other than 8"):
        int4.from_autoawq(p["qweight"], p["qzeros"], p["scales"], zero_point=False, **kw)
    with pytest.raises(Int4FormatError, match="group_size 48 must divide"):
        int4.from_autoawq(p["qweight"], p["qzeros"], p["scales"], zero_point=True,
                          **{**kw, "group_size": 48})


def test_compressed_tensors_errors():
    wt = _random_int4(16, 128, 32, symmetric=False)
    p = int4.to_compressed_tensors(wt, torch.bfloat16)
    kw = dict(in_features=128, out_features=16, group_size=32, name="q_proj")
    with pytest.raises(Int4FormatError, match=r"q_proj\.weight_zero_point is missing"):
        int4.from_compressed_tensors(p["weight_packed"], p["weight_scale"], None, p["weight_shape"],
                                     symmetric=False, **kw)
    with pytest.raises(Int4FormatError, match=r"weight_shape is \[16, 128\], expected \[16, 256\]"):
        int4.from_compressed_tensors(p["weight_packed"], p["weight_scale"], p["weight_zero_point"],
                                     p["weight_shape"], symmetric=False, **{**kw, "in_features": 256})
    with pytest.raises(Int4FormatError, match=r"weight_scale has shape \(16, 4\), expected \(16, 2\)"):
        int4.from_compressed_tensors(p["weight_packed"], p["weight_scale"], p["weight_zero_point"],
                                     p["weight_shape"], symmetric=False, **{**kw, "group_size": 64})


def test_kernel_layout_regroups_large_groups_and_rejects_others():
    wt = _random_int4(8, 512, 256, symmetric=False)
    kw = int4.to_kernel_layout(wt, torch.float32)
    assert kw.group_size == 128 and kw.scales.shape == (8, 4)
    torch.testing.assert_close(dequantize_w4a16(kw), wt.dequantize(), rtol=0, atol=0)
    per_channel = int4.to_kernel_layout(_random_int4(8, 384, 384, symmetric=True), torch.bfloat16)
    assert per_channel.group_size == 128 and per_channel.zeros is None
    with pytest.raises(Int4FormatError, match="group_size 48 is not supported"):
        int4.to_kernel_layout(_random_int4(8, 96, 48, symmetric=True), torch.float16)
    assert torch.equal(int4.from_kernel_layout(int4.to_kernel_layout(wt, torch.float32)).codes.view(8, -1), wt.codes)


@pytest.mark.parametrize("zero_point", [True, False])
def test_quantize_int4_round_to_nearest(zero_point):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(32, 256, generator=gen)
    wt = int4.quantize_int4(w, 64, zero_point)
    assert wt.symmetric is (not zero_point)
    assert int(wt.codes.max()) <= 15
    err = (wt.dequantize() - w).abs().view(32, 4, 64)
    half_step = wt.scales.unsqueeze(-1) / 2
    # round to nearest: every weight inside the group's range is within half a step
    assert bool((err <= half_step * (1 + 1e-5) + 1e-7).all())


def test_int4_checkpoint_reader_names_missing_and_unexpected_tensors(tmp_path):
    import shutil

    from safetensors.torch import save_file

    from gpu_engine.errors import ModelLoadError
    from gpu_engine.quant.int4_checkpoint import load_dequantized, read_scheme

    scheme = read_scheme(FIXTURE)
    assert (scheme.fmt, scheme.group_size, scheme.symmetric) == ("autoawq", 64, False)
    model, cfg = load_dequantized(FIXTURE)
    assert cfg.num_layers == 2
    tensors = load_file(str(FIXTURE / "model.safetensors"))
    for drop, match in (("model.layers.1.mlp.up_proj.qzeros", r"up_proj\.qzeros is missing"),
                        ("model.layers.0.post_attention_layernorm.weight", "lacks .*post_attention_layernorm"),
                        ("model.layers.1.self_attn.k_proj.qweight", r"k_proj\.qweight is missing")):
        bad = tmp_path / drop
        bad.mkdir()
        shutil.copy(FIXTURE / "config.json", bad / "config.json")
        save_file({k: v for k, v in tensors.items() if k != drop}, str(bad / "model.safetensors"))
        with pytest.raises((Int4FormatError, ModelLoadError), match=match):
            load_dequantized(bad)


def test_int4_scheme_errors_name_the_setting():
    from gpu_engine.quant.int4_checkpoint import Int4Scheme

    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    assert Int4Scheme.from_quantization_config(awq) == Int4Scheme("autoawq", 128, False)
    with pytest.raises(Int4FormatError, match="AWQ bits 8 are not supported; expected 4"):
        Int4Scheme.from_quantization_config({**awq, "bits": 8})
    with pytest.raises(Int4FormatError, match="AWQ version 'gemv' is not supported"):
        Int4Scheme.from_quantization_config({**awq, "version": "gemv"})
    ct = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                           "strategy": "group", "group_size": 128}}}}
    assert Int4Scheme.from_quantization_config(ct) == Int4Scheme("compressed-tensors", 128, True)
    bad = json.loads(json.dumps(ct))
    bad["config_groups"]["g"]["weights"]["num_bits"] = 8
    with pytest.raises(Int4FormatError, match="num_bits=8 type='int'; expected 4, int"):
        Int4Scheme.from_quantization_config(bad)
    with pytest.raises(Int4FormatError, match="quant_method 'fp8' is not an INT4 format"):
        Int4Scheme.from_quantization_config({"quant_method": "fp8"})
