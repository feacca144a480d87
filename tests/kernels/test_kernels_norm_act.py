"""RMSNorm, fused residual-add + RMSNorm and SiLU-and-mul against taxiway_kernels.reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from taxiway_kernels import reference as R  # noqa: E402
from taxiway_kernels.activation import silu_and_mul  # noqa: E402
from taxiway_kernels.norm import fused_add_rms_norm, rms_norm  # noqa: E402
from taxiway_kernels.testing import rel_err  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The kernels round where torch rounds, so they differ from it by an ulp here and there.
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 5e-3}


def _randn(*shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).mul(2).to(dtype).to(device)


def _close(out, ref, dtype):
    assert not out.isnan().any()
    err = rel_err(out.cpu(), ref.cpu())
    assert err < TOL[dtype], f"{err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 64), (3, 1000), (5, 4096), (1, 16)])
def test_rms_norm(dtype, shape, device):
    x = _randn(*shape, dtype=dtype, device=device, seed=shape[1])
    w = _randn(shape[1], dtype=dtype, device=device, seed=1)
    out = torch.full_like(x, float("nan"))
    rms_norm(x, w, 1e-6, out=out)
    _close(out, R.rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_view_in_place(dtype, device):
    """Qwen3 q-norm: [T, H, D] view into a fused qkv output, normalized in place."""
    qkv = _randn(9, (8 + 2 * 2) * 128, dtype=dtype, device=device, seed=2)
    q = qkv[:, : 8 * 128].view(9, 8, 128)
    w = _randn(128, dtype=dtype, device=device, seed=3)
    ref = R.rms_norm(q, w, 1e-6)
    rest = qkv[:, 8 * 128 :].clone()
    rms_norm(q, w, 1e-6, out=q)
    _close(q, ref, dtype)
    assert torch.equal(qkv[:, 8 * 128 :], rest), "k and v of the qkv tensor must be untouched"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 64), (3, 1000), (4, 4096)])
def test_fused_add_rms_norm(dtype, shape, device):
    x = _randn(*shape, dtype=dtype, device=device, seed=4)
    residual = _randn(*shape, dtype=dtype, device=device, seed=5)
    w = _randn(shape[1], dtype=dtype, device=device, seed=6)
    ref_out, ref_res = R.fused_add_rms_norm(x, residual, w, 1e-5)
    out, res = fused_add_rms_norm(x, residual, w, 1e-5)
    assert out is x and res is residual
    assert torch.equal(residual, ref_res), "the residual sum is rounded exactly as torch does"
    _close(x, ref_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2 * 300), (3, 2 * 2048), (1, 2 * 16)])
def test_silu_and_mul(dtype, shape, device):
    x = _randn(*shape, dtype=dtype, device=device, seed=shape[1])
    out = torch.full((shape[0], shape[1] // 2), float("nan"), dtype=dtype, device=device)
    silu_and_mul(x, out=out)
    _close(out, R.silu_and_mul(x), dtype)


def test_norm_and_act_reject_bad_inputs(device):
    x = _randn(4, 64, dtype=torch.float16, device=device, seed=0)
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, torch.ones(32, dtype=torch.float16, device=device), 1e-6)
    with pytest.raises(ValueError, match="weight has dtype"):
        rms_norm(x, torch.ones(64, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual has shape"):
        fused_add_rms_norm(x, x[:2].clone(), torch.ones(64, dtype=torch.float16, device=device), 1e-6)
    with pytest.raises(ValueError, match="stride 1"):
        rms_norm(x.t(), torch.ones(4, dtype=torch.float16, device=device), 1e-6)
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        silu_and_mul(x[:, :63])


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["rms_norm", "fused_add_rms_norm", "silu_and_mul"])
def test_llama_shapes_gpu(op):
    dt = torch.bfloat16
    if op == "silu_and_mul":
        x = _randn(8192, 2 * 14336, dtype=dt, device="cuda", seed=1)
        _close(silu_and_mul(x), R.silu_and_mul(x), dt)
        return
    x = _randn(8192, 4096, dtype=dt, device="cuda", seed=2)
    w = _randn(4096, dtype=dt, device="cuda", seed=3)
    if op == "rms_norm":
        _close(rms_norm(x, w, 1e-5), R.rms_norm(x, w, 1e-5), dt)
    else:
        residual = _randn(8192, 4096, dtype=dt, device="cuda", seed=4)
        ref_out, ref_res = R.fused_add_rms_norm(x, residual, w, 1e-5)
        fused_add_rms_norm(x, residual, w, 1e-5)
        assert torch.equal(residual, ref_res)
        _close(x, ref_out, dt)
