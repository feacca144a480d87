"""The small-M FP8 GEMM (taxiway_kernels/fp8_gemv.py: mma and gemv paths, split-K) against
taxiway_kernels.reference.fp8_linear; the CPU interpreter on small shapes, the GPU on Llama-3.1-8B's
shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from taxiway_kernels import reference as R  # noqa: E402
from taxiway_kernels.fp8_gemm import fp8_linear  # noqa: E402
from taxiway_kernels import fp8_gemv  # noqa: E402
from taxiway_kernels.fp8_gemv import FP8SmallMConfig, choose_config, fp8_linear_small_m  # noqa: E402
from taxiway_kernels.testing import rel_err  # noqa: E402

FP8 = torch.float8_e4m3fn
# float32: exact products, float32 sums (order differs); 16-bit outputs: one rounding of the result.
TOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 1e-3}
# On a GPU the FP8 tensor cores add a K tile's products at reduced precision (Hopper keeps about 14
# bits before the float32 promotion after each tile): measured 2.2e-4 on an H200 at K = 512.
GPU_FP32_TOL = 1e-3


def _operands(m, n, k, device, seed=0):
    """(xq, x_scale, wq, w_scale): x per token, W per channel, two W parts of very different size."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    w = torch.randn(n, k, generator=g) * 0.05
    w[: n // 2] *= 30
    xq, xs = R.quantize_fp8(x)
    wq, ws = R.quantize_fp8(w)
    return xq.to(device), xs.to(device), wq.to(device), ws.view(-1).to(device)


def _bias(n, dtype, device, seed=9):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def _close(out, ops, bias, dtype):
    assert out.dtype == dtype and not out.isnan().any()
    ref = R.fp8_linear(*ops, bias, torch.float32)
    err = rel_err(out.float().cpu(), ref.cpu())
    tol = GPU_FP32_TOL if out.is_cuda and dtype == torch.float32 else TOL[dtype]
    assert err < tol, f"{err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16, 64])
def test_fp8_small_m_default_config(m, dtype, device):
    n, k = 37, 512  # odd N: a masked edge tile
    ops = _operands(m, n, k, device, seed=m)
    bias = _bias(n, dtype, device)
    _close(fp8_linear_small_m(*ops, bias, dtype), ops, bias, dtype)


CONFIGS = [
    FP8SmallMConfig("mma", block_m=16, block_n=16, block_k=64, split_k=1),
    FP8SmallMConfig("mma", block_m=16, block_n=32, block_k=64, split_k=3),  # 8 K tiles over 3 splits
    FP8SmallMConfig("mma", block_m=32, block_n=64, block_k=128, split_k=4, num_stages=2),
    FP8SmallMConfig("gemv", block_n=16, block_k=128, split_k=1),
    FP8SmallMConfig("gemv", block_n=8, block_k=64, split_k=3),
    FP8SmallMConfig("mma", block_m=32, block_n=32, block_k=64, split_k=3, reduce="last_split"),
    FP8SmallMConfig("gemv", block_n=16, block_k=128, split_k=4, reduce="last_split"),
]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.path}-m{c.block_m}-n{c.block_n}-s{c.split_k}-{c.reduce}")
def test_fp8_small_m_every_path_and_split(cfg, with_bias, device):
    # mma: M over two 32-row tiles; gemv (one x row a program): a few rows. N is no tile's multiple.
    m, n, k = (37 if cfg.path == "mma" else 5), 45, 512
    ops = _operands(m, n, k, device, seed=3)
    bias = _bias(n, torch.bfloat16, device) if with_bias else None
    for _ in range(2 if cfg.reduce == "last_split" else 1):  # a second call finds the counters reset
        _close(fp8_linear_small_m(*ops, bias, torch.bfloat16, config=cfg), ops, bias, torch.bfloat16)
    if cfg.reduce == "last_split":
        assert not fp8_gemv._counters[ops[0].device].any(), "every tile's counter back at 0"


def test_fp8_small_m_static_scale_and_short_k(device):
    """A static activation scale expanded to [M, 1] (row stride 0); K = 272 has no K tile of 32 (what
    FP8 tensor-core dots need on a GPU): the gemv path, 16-wide K tiles."""
    m, n, k = 5, 24, 272
    xq, _, wq, ws = _operands(m, n, k, device, seed=4)
    xs = torch.full((1, 1), 0.03, device=device).expand(m, 1)
    cfg = choose_config(m, n, k, torch.device(device))
    assert (cfg.path, cfg.block_k) == ("gemv", 16)
    out = fp8_linear_small_m(xq, xs, wq, ws, None, torch.float32)
    _close(out, (xq, xs, wq, ws), None, torch.float32)


def test_fp8_small_m_keeps_subnormal_codes(device):
    """E4M3 subnormals (down to 2^-9) multiply exactly: the GPU (and the interpreter) keep them."""
    m, n, k = 2, 16, 128
    tiny = 2.0**-9
    xq = torch.full((m, k), tiny, device=device).to(FP8)
    wq = torch.full((n, k), 3 * tiny, device=device).to(FP8)
    ones_m, ones_n = torch.ones(m, 1, device=device), torch.ones(n, device=device)
    for path in ("mma", "gemv"):
        out = fp8_linear_small_m(xq, ones_m, wq, ones_n, None, torch.float32,
                                 config=FP8SmallMConfig(path, block_n=16, block_k=64, split_k=2))
        assert torch.equal(out.cpu(), torch.full((m, n), k * 3 * tiny * tiny)), path


def test_fp8_small_m_choose_config():
    cpu = torch.device("cpu")  # 4 multiprocessors off CUDA (taxiway_kernels._triton_compat.sm_count)
    one = choose_config(1, 64, 4096, cpu)
    assert (one.path, one.block_m, one.block_n, one.block_k) == ("mma", 16, 64, 256)
    assert one.split_k == 8, "one N tile: K split until 2 programs per multiprocessor"
    assert choose_config(64, 4096, 14336, cpu) == FP8SmallMConfig(
        "mma", block_m=64, block_n=64, block_k=256, split_k=1, num_stages=3)
    assert choose_config(33, 64, 4096, cpu).block_m == 64


def test_fp8_small_m_rejects_bad_inputs(device):
    xq, xs, wq, ws = _operands(4, 32, 128, device)
    with pytest.raises(ValueError, match="bias has dtype torch.float32, expected out_dtype torch.bfloat16"):
        fp8_linear_small_m(xq, xs, wq, ws, torch.zeros(32, device=device))
    with pytest.raises(ValueError, match=r"bias has shape \(8,\), expected \(32,\)"):
        fp8_linear_small_m(xq, xs, wq, ws, torch.zeros(8, device=device), torch.float32)
    with pytest.raises(ValueError, match="out_dtype has dtype torch.int32"):
        fp8_linear_small_m(xq, xs, wq, ws, None, torch.int32)
    with pytest.raises(ValueError, match="block_k 256 must divide K = 128"):
        fp8_linear_small_m(xq, xs, wq, ws, config=FP8SmallMConfig(block_k=256))
    with pytest.raises(ValueError, match="K a multiple of 16"):
        fp8_linear_small_m(xq[:, :40].contiguous(), xs, wq[:, :40].contiguous(), ws)
    with pytest.raises(ValueError, match="weight has dtype"):
        fp8_linear_small_m(xq, xs, wq.float(), ws)
    with pytest.raises(ValueError, match="mma tiles need block_m, block_n >= 16 and block_k >= 32"):
        FP8SmallMConfig("mma", block_m=8)
    with pytest.raises(ValueError, match="block_k >= 32"):
        FP8SmallMConfig("mma", block_k=16)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        FP8SmallMConfig("gemv", block_n=48)
    with pytest.raises(ValueError, match="path must be mma or gemv"):
        FP8SmallMConfig("wgmma")
    with pytest.raises(ValueError, match="reduce must be kernel or last_split"):
        FP8SmallMConfig(reduce="atomic")
    with pytest.raises(ValueError, match="counts at most 65536 tiles"):
        fp8_gemv._tile_counters(torch.device(device), 1 << 17)


# ---- GPU: Llama-3.1-8B shapes ----

SHAPES_8B = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 64])
@pytest.mark.parametrize("name,n,k", SHAPES_8B)
def test_fp8_small_m_llama_8b_shapes_gpu(name, n, k, m):
    """fp8_linear takes the small-M kernel (bit for bit: it is deterministic) and matches the reference."""
    ops = _operands(m, n, k, "cuda", seed=n + m)
    out = fp8_linear(*ops, None, torch.bfloat16)
    assert torch.equal(out, fp8_linear_small_m(*ops, None, torch.bfloat16)), "dispatch or determinism"
    _close(out, ops, None, torch.bfloat16)
    gemv = FP8SmallMConfig("gemv", block_n=16, block_k=512, split_k=2)
    if m <= 4:
        _close(fp8_linear_small_m(*ops, None, torch.bfloat16, config=gemv), ops, None, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("reduce", ["kernel", "last_split"])
def test_fp8_small_m_in_a_cuda_graph_gpu(reduce):
    """Decode runs the linears inside CUDA graphs: the split-K workspace comes from the graph's pool,
    the last_split counters (made by the eager call first) reset themselves between replays."""
    ops = _operands(1, 4096, 4096, "cuda", seed=11)
    cfg = dataclasses.replace(choose_config(1, 4096, 4096, torch.device("cuda")), reduce=reduce)
    assert cfg.split_k > 1, cfg
    eager = fp8_linear_small_m(*ops, config=cfg)
    assert torch.equal(eager, fp8_linear(*ops)), "deterministic: same sums in the same order"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_linear_small_m(*ops, config=cfg)
    codes = ops[0].view(torch.uint8)
    codes.copy_(codes.flip(1))  # a new input in the same buffer
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp8_linear(*ops)) and not torch.equal(out, eager)
