"""Int4Linear: fused parts load from canonical INT4 weights, forward equals the reference, the
stored bytes are the INT4 buffers, bad parts are named."""

from __future__ import annotations

import pytest
import torch

from gpu_engine.quant.int4 import Int4FormatError, quantize_int4
from gpu_engine.quant.int4_linear import Int4Linear


def _dense(n, k, seed):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("symmetric", [False, True])
def test_fused_parts_forward_equals_dequantized_linear(symmetric):
    k, parts = 128, [64, 32, 32]
    lin = Int4Linear(k, parts, bias=True, group_size=64, symmetric=symmetric, dtype=torch.float32)
    ws = [quantize_int4(_dense(n, k, i), 64, zero_point=not symmetric) for i, n in enumerate(parts)]
    for i, wt in enumerate(ws):
        lin.load_part(i, wt, name=f"part{i}")
    lin.bias.copy_(torch.randn(sum(parts)))
    dense = torch.cat([wt.dequantize() for wt in ws])
    x = torch.randn(3, 5, k)
    torch.testing.assert_close(lin(x), x @ dense.t() + lin.bias, rtol=1e-5, atol=1e-5)
    stored = sum(b.numel() * b.element_size() for b in lin.buffers())
    assert stored == lin.weight4().nbytes() == 128 * 128 // 2 + 128 * 2 * 4 + (0 if symmetric else 128 * 2)


def test_load_part_names_what_is_wrong():
    lin = Int4Linear(128, [32, 32], bias=False, group_size=64, symmetric=False, dtype=torch.float16)
    with pytest.raises(Int4FormatError, match=r"k_proj has shape \(16, 128\), expected \(32, 128\)"):
        lin.load_part(1, quantize_int4(_dense(16, 128, 0), 64), name="k_proj")
    with pytest.raises(Int4FormatError, match="k_proj is symmetric, but this layer was made asymmetric"):
        lin.load_part(1, quantize_int4(_dense(32, 128, 0), 64, zero_point=False), name="k_proj")
    with pytest.raises(Int4FormatError, match="k_proj has group size 32, expected 64"):
        lin.load_part(1, quantize_int4(_dense(32, 128, 0), 32), name="k_proj")
    with pytest.raises(Int4FormatError, match="group_size 48"):
        Int4Linear(96, [8], bias=False, group_size=48, symmetric=True, dtype=torch.float16)


def test_dummy_weights_are_random_and_finite():
    lin = Int4Linear(256, [64], bias=False, group_size=128, symmetric=False, dtype=torch.float32)
    lin.init_dummy(torch.Generator().manual_seed(0))
    y = lin(torch.randn(2, 256))
    assert torch.isfinite(y).all() and y.std() > 0
    assert lin.qweight.unique().numel() > 100
