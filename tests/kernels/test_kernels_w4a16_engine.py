"""The engine's INT4 layers, as the AWQ method loads them from a checkpoint AutoAWQ wrote
(tests/data/tiny-llama-autoawq), drive the W4A16 kernels: every fused linear's buffers, run
through the kernel's gemv (one token) and mm (a few) paths, give the layer's reference forward
(what the CPU engine computes). CPU interpreter here, the GPU where there is one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from taxiway_kernels import w4a16  # noqa: E402
from taxiway_kernels.testing import rel_err  # noqa: E402

AUTOAWQ = Path(__file__).resolve().parents[1] / "data" / "tiny-llama-autoawq"


@pytest.fixture(scope="module")
def layer():
    from taxiway import LLM

    return LLM(str(AUTOAWQ), device="cpu", num_kv_blocks=16).engine.runner.model.layers[1]


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("name", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
def test_loaded_int4_layer_runs_in_the_kernel(layer, name, m, device):
    lin = getattr(layer, name)
    x = torch.randn(m, lin.in_features, generator=torch.Generator().manual_seed(m))
    want = lin(x)  # the CPU reference: dequantize once, F.linear
    w = lin.weight4()
    moved = type(w)(w.qweight.to(device), w.scales.to(device), None if w.zeros is None else w.zeros.to(device),
                    w.group_size)
    got = w4a16.w4a16_linear(x.to(device), moved).cpu()
    assert rel_err(got, want) < 1e-5, name
