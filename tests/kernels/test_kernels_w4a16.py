"""The W4A16 GEMM (every path: gemv, mm, mm swapped, split-K, dequantize + cuBLAS) against the
plain-torch reference; the CPU interpreter on small shapes, the GPU on Llama-3.1-8B's shapes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gpu_engine.quant.int4 import Int4Weight, quantize_int4, to_kernel_layout  # noqa: E402
from taxiway_kernels import w4a16  # noqa: E402
from taxiway_kernels.testing import rel_err  # noqa: E402
from taxiway_kernels.w4a16 import W4A16Config  # noqa: E402
from taxiway_kernels.w4a16_reference import dequantize_w4a16, w4a16_linear as reference  # noqa: E402

# Tensor-core paths round the dequantized weight to x's dtype (as AWQ kernels do); the gemv path
# does not, so in float32 everything agrees to summation order.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}


def _weight(n, k, g, symmetric, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // g, generator=gen) * 0.02 + 0.005
    zeros = None if symmetric else torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8)
    w = to_kernel_layout(Int4Weight(codes, scales, zeros, g), dtype)
    return type(w)(w.qweight.to(device), w.scales.to(device),
                   None if w.zeros is None else w.zeros.to(device), g)


def _x(m, k, dtype, device, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def _close(out, ref, dtype):
    assert not out.isnan().any()
    err = rel_err(out.float().cpu(), ref.float().cpu())
    assert err < TOL[dtype], f"{err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16, 40])
@pytest.mark.parametrize("group_size,symmetric", [(64, False), (32, True), (128, False)])
def test_w4a16_default_paths(dtype, m, group_size, symmetric, device):
    n, k = 48, 256
    w = _weight(n, k, group_size, symmetric, dtype, device)
    x = _x(m, k, dtype, device)
    bias = _x(1, n, dtype, device, seed=2)[0]
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    w4a16.w4a16_linear(x, w, bias, out=out)
    _close(out, reference(x, w, bias), dtype)


CONFIGS = [
    W4A16Config("gemv", block_n=16, block_k=128, split_k=1),
    W4A16Config("gemv", block_n=8, block_k=256, split_k=3),  # K = 512 not a multiple of 3 splits
    W4A16Config("gemv", block_n=32, block_k=512, split_k=1),
    W4A16Config("gemv", block_n=16, block_k=128, split_k=2, unpack="i2f"),
    W4A16Config("mm", block_m=16, block_n=16, block_k=64, split_k=4, swap_ab=True),
    W4A16Config("mm", block_m=32, block_n=32, block_k=32, split_k=1, swap_ab=False, group_m=2),
    W4A16Config("mm", block_m=16, block_n=64, block_k=64, split_k=2, swap_ab=False),
    W4A16Config("mm", block_m=16, block_n=32, block_k=64, split_k=2, swap_ab=True, unpack="i2f"),
    W4A16Config("dequant", block_n=16, block_k=64),
]


def _cfg_id(c: W4A16Config) -> str:
    return f"{c.path}-n{c.block_n}-k{c.block_k}-s{c.split_k}-swap{int(c.swap_ab)}-{c.unpack}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_w4a16_every_path_and_split(cfg, dtype, device):
    n, k = 40, 512  # N not a multiple of the tiles: masked edges
    m = 1 if cfg.path == "gemv" else 37
    w = _weight(n, k, 64, False, dtype, device, seed=3)
    x = _x(m, k, dtype, device, seed=4)
    bias = _x(1, n, dtype, device, seed=5)[0] if cfg.split_k > 1 else None
    _close(w4a16.w4a16_linear(x, w, bias, config=cfg), reference(x, w, bias), dtype)


# The fast unpacking (magic-number floats; bf16 / fp16 pairs in PTX on CUDA) at M = 1 and the
# small-M tiles: one-hot rows of x read single columns of the weight, so y must equal the
# reference's dequantized weight rounded to x's dtype bit for bit (every product is w * 1, every
# sum has one non-zero term, split-K too).
ONE_HOT_CONFIGS = [
    W4A16Config("gemv", block_n=32, block_k=256, split_k=1),
    W4A16Config("gemv", block_n=16, block_k=128, split_k=4),
    W4A16Config("gemv", block_n=16, block_k=1024, split_k=1),  # block_k > K: masked along K
    W4A16Config("mm", block_m=16, block_n=64, block_k=64, split_k=2, swap_ab=True),
    W4A16Config("mm", block_m=16, block_n=32, block_k=32, split_k=1, swap_ab=True),
    W4A16Config("mm", block_m=32, block_n=32, block_k=64, split_k=1, swap_ab=False),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("cfg", ONE_HOT_CONFIGS, ids=_cfg_id)
def test_w4a16_fast_unpack_is_exact(cfg, symmetric, dtype, device):
    n, k, g = 40, 512, 64 if cfg.block_k >= 64 else 32  # odd N: masked rows
    w = _weight(n, k, g, symmetric, dtype, device, seed=11)
    m = 1 if cfg.path == "gemv" else 13
    cols = torch.randperm(k, generator=torch.Generator().manual_seed(12))[:m]
    x = torch.zeros(m, k, dtype=dtype)
    x[torch.arange(m), cols] = 1.0
    out = w4a16.w4a16_linear(x.to(device), w, config=cfg)
    expect = dequantize_w4a16(w, torch.float32)[:, cols.to(device)].t().to(dtype)
    assert torch.equal(out, expect)


@pytest.mark.parametrize("path", ["gemv", "mm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w4a16_fast_and_i2f_unpack_agree(path, dtype, device):
    """Both unpackings give the same weights (the mm tile's columns in another order: the sums
    differ in rounding only)."""
    w = _weight(48, 256, 64, False, dtype, device, seed=13)
    m = 1 if path == "gemv" else 24
    x = _x(m, 256, dtype, device, seed=14)
    cfg = dict(block_m=32, block_n=16, block_k=64, split_k=2, swap_ab=True) if path == "mm" else dict(block_n=16, block_k=128)
    fast = w4a16.w4a16_linear(x, w, config=W4A16Config(path, **cfg))
    i2f = w4a16.w4a16_linear(x, w, config=W4A16Config(path, **cfg, unpack="i2f"))
    _close(fast, i2f.float(), dtype)


def test_w4a16_default_config_takes_the_measured_paths():
    cpu = torch.device("cpu")
    for dtype in (torch.bfloat16, torch.float32):  # M = 1: the gemv with the fast unpack
        cfg = w4a16.choose_config(1, 4096, 4096, 128, cpu, dtype)
        assert cfg.path == "gemv" and cfg.unpack == "fast"
    for m in (4, 16, 64):  # small M: the swapped mm tile with the I2F unpack (faster on an H200)
        cfg = w4a16.choose_config(m, 4096, 4096, 128, cpu)
        assert cfg.unpack == "i2f" and cfg.path == "mm" and cfg.swap_ab and cfg.block_m == max(16, m)
    with pytest.raises(ValueError, match="unpack must be one of"):
        W4A16Config("gemv", unpack="lut")


def test_w4a16_strided_x_rows_and_out_view(device):
    dtype = torch.bfloat16
    w = _weight(32, 128, 64, True, dtype, device)
    big = _x(5, 256, dtype, device)
    x = big[:, :128]  # row stride 256
    out_big = torch.zeros(5, 64, dtype=dtype, device=device)
    w4a16.w4a16_linear(x, w, out=out_big[:, 16:48])
    _close(out_big[:, 16:48], reference(x, w), dtype)
    assert not out_big[:, :16].any() and not out_big[:, 48:].any()


def test_dequantize_kernel_is_exact(device):
    for symmetric in (False, True):
        w = _weight(24, 256, 32, symmetric, torch.bfloat16, device)
        assert torch.equal(w4a16.dequantize(w, torch.float32).cpu(),
                           dequantize_w4a16(w, torch.float32).cpu())


def test_w4a16_of_a_quantized_weight_tracks_the_float_linear(device):
    """End to end: quantize a real-valued weight, then the kernel output is close to x @ W.T."""
    gen = torch.Generator().manual_seed(7)
    dense = torch.randn(64, 256, generator=gen) * 0.05
    w = to_kernel_layout(quantize_int4(dense, 64, zero_point=True), torch.float32)
    w = type(w)(w.qweight.to(device), w.scales.to(device), w.zeros.to(device), 64)
    x = _x(4, 256, torch.float32, device)
    err = rel_err(w4a16.w4a16_linear(x, w).cpu(), x.cpu() @ dense.t())
    assert err < 0.1, f"{err:.3f}"  # 4-bit rounding, not a kernel error


def test_w4a16_rejects_bad_inputs(device):
    w = _weight(16, 128, 64, False, torch.float16, device)
    x = _x(2, 128, torch.float16, device)
    with pytest.raises(ValueError, match="x has K = 64, expected the weight's in_features 128"):
        w4a16.w4a16_linear(x[:, :64].contiguous(), w)
    with pytest.raises(ValueError, match="scales has dtype torch.float16, expected x's dtype torch.bfloat16"):
        w4a16.w4a16_linear(x.bfloat16(), w)
    with pytest.raises(ValueError, match="stride 1"):
        w4a16.w4a16_linear(_x(128, 2, torch.float16, device).t(), w)
    with pytest.raises(ValueError, match=r"bias has shape \(8,\), expected \(16,\)"):
        w4a16.w4a16_linear(x, w, torch.zeros(8, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match=r"out has shape \(2, 8\), expected \(2, 16\)"):
        w4a16.w4a16_linear(x, w, out=torch.empty(2, 8, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="the gemv path takes M = 1"):
        w4a16.w4a16_linear(x, w, config=W4A16Config("gemv"))
    with pytest.raises(ValueError, match="block_k 128 must be at least 16 and divide group_size 64"):
        w4a16.w4a16_linear(x, w, config=W4A16Config("mm", block_k=128))
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        W4A16Config("mm", block_n=48)
    with pytest.raises(ValueError, match="group_size 48 is not supported"):
        type(w)(w.qweight, w.scales, w.zeros, 48)
    with pytest.raises(ValueError, match=r"zeros has shape \(16, 1\), expected \(16, 2\)"):
        type(w)(w.qweight, w.scales, w.zeros[:, :1], 64)


# Llama-3.1-8B linears: (name, N, K)
SHAPES_8B = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256, 1024, 8192])
@pytest.mark.parametrize("name,n,k", SHAPES_8B)
def test_w4a16_llama_8b_shapes_gpu(name, n, k, m):
    dtype = torch.bfloat16
    w = _weight(n, k, 128, False, dtype, "cuda", seed=n + k)
    x = _x(m, k, dtype, "cuda", seed=m)
    ref = (x.float() @ w4a16.dequantize(w, torch.float32).t()).to(dtype)
    _close(w4a16.w4a16_linear(x, w), ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_w4a16_every_path_gpu_real_k(cfg):
    dtype = torch.float16
    n, k = 4096, 14336
    w = _weight(n, k, 64, True, dtype, "cuda", seed=9)
    m = 1 if cfg.path == "gemv" else 100
    x = _x(m, k, dtype, "cuda", seed=10)
    ref = (x.float() @ w4a16.dequantize(w, torch.float32).t()).to(dtype)
    _close(w4a16.w4a16_linear(x, w, config=cfg), ref, dtype)


@pytest.mark.gpu
def test_int4_linear_module_runs_the_kernel_on_cuda():
    from gpu_engine.quant.int4_linear import Int4Linear

    lin = Int4Linear(4096, [4096, 1024, 1024], bias=True, group_size=128, symmetric=False,
                     dtype=torch.bfloat16, device="cuda")
    lin.init_dummy(torch.Generator(device="cuda").manual_seed(0))
    x = _x(7, 4096, torch.bfloat16, "cuda")
    _close(lin(x), reference(x, lin.weight4(), lin.bias), torch.bfloat16)
