"""GPTQ rounding (gpu_engine/quant/gptq.py) on small random linears: it gives quantize_int4's format,
beats round-to-nearest on the output error where inputs are correlated, equals it where they are
not (H = I), and leaves never-firing input channels at weight 0; act order (static groups)
helps where input channels differ in scale. The same for FP8 with per-channel scales."""

from __future__ import annotations

import pytest
import torch

from gpu_engine.quant.fp8 import quantize_weight_per_channel
from gpu_engine.quant.gptq import gptq_fp8, gptq_int4, hessian
from gpu_engine.quant.int4 import Int4Weight, quantize_int4

N, K, G = 48, 256, 32  # K spans two of GPTQ's 128-column blocks


def _weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.02


def _correlated_inputs(t: int = 1024, seed: int = 1) -> torch.Tensor:  # [t, K]
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K**0.5
    return torch.randn(t, K, generator=g) @ mix + 0.1 * torch.randn(t, K, generator=g)


def _output_error(x: torch.Tensor, w: torch.Tensor, q: Int4Weight | tuple[torch.Tensor, torch.Tensor]) -> float:
    """||x w^T - x q^T|| for an INT4 weight or an FP8 (weight, per-channel scale) pair."""
    dq = q.dequantize() if isinstance(q, Int4Weight) else q[0].float() * q[1][:, None]
    return float((x @ w.t() - x @ dq.t()).norm())


VARIANTS = [dict(static_groups=True), dict(static_groups=False), dict(static_groups=True, act_order=True)]


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gptq_gives_valid_int4_in_quantize_int4s_format(zero_point, variant):
    w = _weight()
    q = gptq_int4(w, hessian(_correlated_inputs()), G, zero_point, **variant)
    ref = quantize_int4(w, G, zero_point)
    assert (q.shape, q.group_size, q.symmetric) == (ref.shape, G, not zero_point)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15
    assert q.scales.dtype == ref.scales.dtype and q.scales.shape == ref.scales.shape
    if zero_point:
        assert q.zeros.dtype == torch.uint8 and int(q.zeros.max()) <= 15
    if variant["static_groups"]:  # the groups' ranges are the ones rounding to nearest takes
        torch.testing.assert_close(q.scales, ref.scales, rtol=0, atol=0)


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gptq_output_error_below_round_to_nearest_on_correlated_inputs(zero_point, variant):
    w, x = _weight(), _correlated_inputs()
    gptq = _output_error(x, w, gptq_int4(w, hessian(x), G, zero_point, **variant))
    rtn = _output_error(x, w, quantize_int4(w, G, zero_point))
    assert gptq < 0.8 * rtn, (gptq, rtn)


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gptq_with_identity_hessian_is_round_to_nearest(zero_point, variant):
    """H = I: the inverse's Cholesky factor is diagonal, so no column's error reaches another
    (and the order the columns are rounded in does not matter)."""
    w = _weight()
    q = gptq_int4(w, torch.eye(K), G, zero_point, **variant)
    ref = quantize_int4(w, G, zero_point)
    assert torch.equal(q.codes, ref.codes) and torch.equal(q.scales, ref.scales)
    assert (q.zeros is None) == (ref.zeros is None)
    if zero_point:
        assert torch.equal(q.zeros, ref.zeros)


def test_gptq_zeroes_dead_input_channels_and_keeps_the_outputs():
    x = _correlated_inputs()
    x[:, :5] = 0
    w = _weight()
    q = gptq_int4(w, hessian(x), G, True)
    assert bool((q.dequantize()[:, :5] == 0).all())
    assert _output_error(x, w, q) < _output_error(x, w, quantize_int4(w, G, True))


def test_act_order_rounds_high_energy_channels_first_and_beats_natural_order():
    """Inputs whose scale grows along K: natural order rounds the largest channels last, when no
    columns are left to take their error; act order rounds them first."""
    w, x = _weight(), _correlated_inputs() * torch.linspace(0.2, 3, K)
    natural = _output_error(x, w, gptq_int4(w, hessian(x), G))
    ordered = _output_error(x, w, gptq_int4(w, hessian(x), G, act_order=True))
    assert ordered < 0.8 * natural, (ordered, natural)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_fp8_is_per_channel_fp8_that_beats_round_to_nearest(act_order):
    w, x = _weight(), _correlated_inputs()
    q, scale = gptq_fp8(w, hessian(x), act_order=act_order)
    ref_q, ref_scale = quantize_weight_per_channel(w)
    assert q.dtype == ref_q.dtype == torch.float8_e4m3fn and q.shape == ref_q.shape
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    assert _output_error(x, w, (q, scale)) < 0.8 * _output_error(x, w, (ref_q, ref_scale))
    identity, _ = gptq_fp8(w, torch.eye(K), act_order=act_order)
    assert torch.equal(identity.view(torch.uint8), ref_q.view(torch.uint8))


def test_gptq_rejects_mismatched_shapes_and_settings():
    with pytest.raises(ValueError, match="group_size 48 does not divide in_features 256"):
        gptq_int4(_weight(), torch.eye(K), 48)
    with pytest.raises(ValueError, match="hessian must be \\[256, 256\\], got \\(128, 128\\)"):
        gptq_int4(_weight(), torch.eye(128), G)
    with pytest.raises(ValueError, match="act_order needs static_groups"):
        gptq_int4(_weight(), torch.eye(K), G, static_groups=False, act_order=True)
