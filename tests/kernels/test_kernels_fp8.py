"""FP8 kernels against taxiway_kernels.reference: quantize, RMSNorm / residual + RMSNorm / SiLU-and-mul with
FP8 outputs, the FP8 GEMM (torch._scaled_mm, which also runs on the CPU), and the FP8 KV cache
(rotary + KV write, paged decode and prefill attention)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from taxiway_kernels import reference as R  # noqa: E402
from taxiway_kernels.activation import silu_and_mul_quant_fp8  # noqa: E402
from taxiway_kernels.fp8 import quantize_fp8  # noqa: E402
from taxiway_kernels.fp8_gemm import fp8_linear  # noqa: E402
from taxiway_kernels.norm import fused_add_rms_norm_quant_fp8, rms_norm_quant_fp8  # noqa: E402
from taxiway_kernels.rotary import rope_and_write_kv  # noqa: E402
from taxiway_kernels import triton_attention as A  # noqa: E402
from taxiway_kernels.testing import make_cos_sin_cache, make_paged_batch, rel_err  # noqa: E402

FP8 = torch.float8_e4m3fn
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _randn(*shape, dtype, device, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).mul(scale).to(dtype).to(device)


def _static(value: float, device) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32, device=device)


def _same_fp8(out, ref, max_mismatch=0.0):
    """q: E4M3 codes equal (a last-ulp difference allowed on max_mismatch of them); scales close."""
    (q, s), (rq, rs) = out, ref
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == (q.shape[0], 1)
    torch.testing.assert_close(s.cpu(), rs.cpu(), rtol=1e-6, atol=0)
    diff = (q.cpu().float() - rq.cpu().float()).abs()
    # E4M3: 3 mantissa bits (a spacing of at most |v| / 8), and 2^-9 apart below 2^-6 (subnormals)
    ulp = torch.maximum(rq.cpu().float().abs() * 2**-3, torch.tensor(2.0**-9))
    assert (diff <= ulp * 1.01).all(), "codes differ by more than one ulp"
    assert (diff > 0).sum() <= max_mismatch * diff.numel()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 64), (3, 1000), (1, 4096), (0, 64)])
@pytest.mark.parametrize("static", [None, 0.02])
def test_quantize_fp8(dtype, shape, static, device):
    x = _randn(*shape, dtype=dtype, device=device, seed=shape[1])
    s = None if static is None else _static(static, device)
    _same_fp8(quantize_fp8(x, s), R.quantize_fp8(x, s))


def test_quantize_fp8_saturates_and_keeps_subnormals(device):
    """A static scale too small saturates at ±448 (never NaN); tiny values stay subnormal."""
    x = torch.tensor([[1000.0, -1000.0, 0.0011, -0.0011, 0.0, 3.0, 2e-4, 448.0]], device=device)
    q, s = quantize_fp8(x, _static(1.0, device))
    assert q.float().cpu().tolist()[0] == [448.0, -448.0, 2**-9, -(2**-9), 0.0, 3.0, 0.0, 448.0]
    q, s = quantize_fp8(torch.zeros(2, 32, device=device))
    assert torch.isfinite(s).all() and (q.float() == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 64), (3, 576), (5, 4096)])
@pytest.mark.parametrize("static", [None, 0.01])
def test_rms_norm_quant_fp8(dtype, shape, static, device):
    x = _randn(*shape, dtype=dtype, device=device, seed=shape[1])
    w = _randn(shape[1], dtype=dtype, device=device, seed=1)
    s = None if static is None else _static(static, device)
    # The kernel's row is rounded where torch rounds, but an ulp of the 16-bit row can move an
    # E4M3 rounding boundary: allow a few one-ulp codes.
    _same_fp8(rms_norm_quant_fp8(x, w, 1e-6, s), R.rms_norm_quant_fp8(x, w, 1e-6, s), max_mismatch=0.01)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [None, 0.01])
def test_fused_add_rms_norm_quant_fp8(dtype, static, device):
    x = _randn(6, 576, dtype=dtype, device=device, seed=4)
    residual = _randn(6, 576, dtype=dtype, device=device, seed=5)
    w = _randn(576, dtype=dtype, device=device, seed=6)
    s = None if static is None else _static(static, device)
    rq, rs, rres = R.fused_add_rms_norm_quant_fp8(x, residual, w, 1e-5, s)
    x_before = x.clone()
    q, scale, res = fused_add_rms_norm_quant_fp8(x, residual, w, 1e-5, s)
    assert res is residual and torch.equal(residual, rres), "the residual sum is rounded as torch does"
    assert torch.equal(x, x_before), "x is read only"
    _same_fp8((q, scale), (rq, rs), max_mismatch=0.01)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2 * 300), (3, 2 * 1536), (2, 2 * 5000), (2, 2 * 17000)])  # last: two passes
@pytest.mark.parametrize("static", [None, 0.05])
def test_silu_and_mul_quant_fp8(dtype, shape, static, device):
    """I = 17000 takes the two-pass path over several column blocks: the per-token amax spans all of them."""
    x = _randn(*shape, dtype=dtype, device=device, seed=shape[1])
    s = None if static is None else _static(static, device)
    _same_fp8(silu_and_mul_quant_fp8(x, s), R.silu_and_mul_quant_fp8(x, s), max_mismatch=0.01)


@pytest.mark.parametrize("one_pass", [True, False])
def test_silu_and_mul_quant_fp8_both_paths_agree(one_pass, device):
    x = _randn(3, 2 * 1000, dtype=torch.bfloat16, device=device, seed=8)
    _same_fp8(silu_and_mul_quant_fp8(x, one_pass=one_pass), silu_and_mul_quant_fp8(x))
    with pytest.raises(ValueError, match="one_pass holds rows up to"):
        silu_and_mul_quant_fp8(torch.zeros(1, 2 * 20000, device=device), one_pass=True)


@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_matches_reference(m, out_dtype, device):
    """torch._scaled_mm with rowwise scales = the dequantized reference (float32 accumulation)."""
    x = _randn(m, 256, dtype=torch.float32, device=device, seed=m)
    w = _randn(128, 256, dtype=torch.float32, device=device, seed=2, scale=0.05)
    w[:64] *= 30  # two parts of very different magnitude, as a fused q/k projection may have
    bias = _randn(128, dtype=out_dtype, device=device, seed=3)
    xq, xs = R.quantize_fp8(x)
    wq, ws = R.quantize_fp8(w)
    out = fp8_linear(xq, xs, wq, ws.view(-1), bias, out_dtype)
    ref = R.fp8_linear(xq, xs, wq, ws.view(-1), bias, torch.float32)
    assert out.dtype == out_dtype
    assert rel_err(out.float().cpu(), ref.cpu()) < 4e-3  # the GEMM's output is rounded to bf16
    exact = x @ w.t() + bias.float()
    assert rel_err(ref.cpu(), exact.cpu()) < 0.06, "W8A8 stays close to the unquantized product"


def test_fp8_linear_rejects_bad_inputs(device):
    xq = torch.zeros(4, 64, device=device).to(FP8)
    xs = torch.ones(4, 1, device=device)
    wq = torch.zeros(32, 64, device=device).to(FP8)
    ws = torch.ones(32, device=device)
    with pytest.raises(ValueError, match="xq has dtype"):
        fp8_linear(xq.float(), xs, wq, ws)
    with pytest.raises(ValueError, match="K a multiple of 16|K and N multiples of 16"):  # small-M | _scaled_mm
        fp8_linear(xq[:, :40].contiguous(), xs, wq[:, :40].contiguous(), ws)
    with pytest.raises(ValueError, match="weight_scale has shape"):
        fp8_linear(xq, xs, wq, ws[:8])
    with pytest.raises(ValueError, match="K differs"):
        fp8_linear(xq, xs, wq[:, :32].contiguous(), ws)
    with pytest.raises(ValueError, match="static_scale must hold one"):
        quantize_fp8(torch.ones(2, 64, device=device), torch.ones(2, device=device))


# ---- FP8 KV cache ----

KV_SCALES = [(1.0, 1.0), (0.5, 0.25), (0.037, 0.011)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_scale", KV_SCALES)
@pytest.mark.parametrize("v_layout", ["row-major", "token-major"])
def test_rope_and_write_kv_fp8(dtype, kv_scale, v_layout, device):
    g = torch.Generator().manual_seed(3)
    heads, kvh, d, bs, t = 8, 2, 64, 16, 13
    qkv = torch.randn(t, (heads + 2 * kvh) * d, generator=g).to(dtype).to(device)
    q, k, v = qkv.view(t, -1, d).split([heads, kvh, kvh], 1)
    k_cache = torch.randn(4, kvh, bs, d, generator=g).to(FP8).to(device)
    v_cache = torch.randn(4, kvh, bs, d, generator=g).to(FP8).to(device)
    if v_layout == "token-major":  # the same values stored [blocks, heads, d, bs] (v_cache_token_major)
        v_cache = v_cache.transpose(2, 3).contiguous().transpose(2, 3)
    slots = torch.randperm(4 * bs, generator=g)[:t]
    slots[::5] = -1
    positions = torch.randint(0, 512, (t,), generator=g).to(device)
    cos_sin = make_cos_sin_cache(512, d).to(device)
    ref = [q.clone(), k, v, positions, cos_sin, k_cache.clone(), v_cache.clone(), slots.to(device)]
    R.rope_and_write_kv(*ref, kv_scale=kv_scale)
    rope_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slots.to(device), kv_scale)
    assert rel_err(q.cpu(), ref[0].cpu()) < (1e-5 if dtype == torch.float32 else 8e-3)
    assert torch.equal(v_cache.view(torch.uint8), ref[6].view(torch.uint8)), "v is quantized bit for bit"
    diff = (k_cache.float() - ref[5].float()).abs().cpu()
    assert (diff <= ref[5].float().abs().cpu() * 2**-3 + 2**-9).all()  # k: at most an ulp (rotation rounding)
    assert (diff > 0).float().mean() < 0.02


def _fp8_batch(seqs, group, dtype, device, seed, kv_scale):
    g = torch.Generator().manual_seed(seed)
    b = make_paged_batch(seqs, num_heads=2 * group, num_kv_heads=2, head_dim=64, dtype=dtype,
                         device=device, generator=g)
    b.k_cache = R.to_fp8(b.k_cache, kv_scale[0])
    b.v_cache = R.to_fp8(b.v_cache, kv_scale[1])
    return b


def _reference_fp8(b, scale, kv_scale, window=None):
    """float64 reference on the dequantized cache."""
    k = b.k_cache.double() * kv_scale[0]
    v = b.v_cache.double() * kv_scale[1]
    return R.paged_attention(b.q.double(), k, v, b.block_tables, b.query_start_loc, b.seq_lens, scale,
                             sliding_window=window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_scale", KV_SCALES[1:])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_fp8_cache(dtype, kv_scale, num_splits, device):
    b = _fp8_batch([(1, 1), (1, 17), (1, 70), (1, 133)], 4, dtype, device, seed=1, kv_scale=kv_scale)
    out = torch.full_like(b.q, float("nan"))
    A.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens,
                             0.125, out=out, num_splits=num_splits, kv_scale=kv_scale)
    assert rel_err(out, _reference_fp8(b, 0.125, kv_scale)) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dot_dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_fp8_cache_dot_dtype(dot_dtype, device):
    """Both dot dtypes of an FP8 cache under bfloat16 queries (float16 is the default) match the
    reference; queries beyond float16's range are clamped to it, not turned into inf / NaN."""
    kv_scale = (0.05, 0.02)
    b = _fp8_batch([(1, 9), (1, 70), (1, 133)], 4, torch.bfloat16, device, seed=3, kv_scale=kv_scale)
    out = torch.full_like(b.q, float("nan"))
    A.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens,
                             0.125, out=out, num_splits=2, kv_scale=kv_scale, fp8_dot_dtype=dot_dtype)
    assert rel_err(out, _reference_fp8(b, 0.125, kv_scale)) < 1e-2
    b.q[0, 0, 0] = 1e6  # beyond float16: one score saturates, the output stays finite
    A.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens,
                             1e-6, out=out, kv_scale=kv_scale)
    assert torch.isfinite(out).all()


def test_decode_attention_rejects_bad_fp8_dot_dtype(device):
    b = make_paged_batch([(1, 5)], num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                         device=device, generator=torch.Generator().manual_seed(0))
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens, 0.1)
    with pytest.raises(ValueError, match="fp8_dot_dtype is for an FP8 cache"):
        A.paged_decode_attention(*args, fp8_dot_dtype=torch.float16)
    fp8 = (b.k_cache.to(torch.float8_e4m3fn), b.v_cache.to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="fp8_dot_dtype must be float16 or q's dtype"):
        A.paged_decode_attention(b.q, *fp8, *args[3:], fp8_dot_dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 24])
def test_mixed_attention_fp8_cache(dtype, window, device):
    seqs = [(1, 40), (1, 97), (13, 61), (40, 40), (37, 120)]
    kv_scale = (0.05, 0.02)
    b = _fp8_batch(seqs, 3, dtype, device, seed=2, kv_scale=kv_scale)
    out = torch.full_like(b.q, float("nan"))
    A.paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens, 0.125,
                      out=out, num_decodes=b.num_decodes, sliding_window=window, kv_scale=kv_scale)
    ref = _reference_fp8(b, 0.125, kv_scale, window)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    # The CPU engine's reference reads the FP8 cache the same way.
    cpu = R.paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens,
                            0.125, sliding_window=window, kv_scale=kv_scale)
    assert rel_err(cpu.double(), ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_prefill_fp8_cache_float16_dots_clamp_q(device):
    """An FP8 cache under bfloat16 queries: the prefill kernel's dots run in float16 (E4M3 converts
    in one step) and match the reference; a query beyond float16's range is clamped, not inf."""
    kv_scale = (0.05, 0.02)
    b = _fp8_batch([(13, 61), (40, 40), (37, 120)], 4, torch.bfloat16, device, seed=4, kv_scale=kv_scale)
    out = A.paged_prefill_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc,
                                    b.seq_lens, 0.125, kv_scale=kv_scale)
    assert rel_err(out, _reference_fp8(b, 0.125, kv_scale)) < 4e-3  # 1.65e-3 measured (bfloat16 dots 1.93e-3)
    b.q[5, 0, 0] = 1e6
    out = A.paged_prefill_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc,
                                    b.seq_lens, 1e-6, kv_scale=kv_scale)
    assert torch.isfinite(out).all()


def test_attention_rejects_scales_without_fp8_cache(device):
    b = make_paged_batch([(1, 5)], num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float16,
                         device=device, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="only FP8 caches scale"):
        A.paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens, 0.1,
                          kv_scale=(0.5, 1.0))
    with pytest.raises(ValueError, match="expected q's dtype"):
        A.paged_attention(b.q, b.k_cache.to(torch.bfloat16), b.v_cache.to(torch.bfloat16), b.block_tables,
                          b.query_start_loc, b.seq_lens, 0.1)


# ---- GPU: Llama-3.1-8B shapes ----

@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 1024])
def test_fp8_gemm_llama_shapes_gpu(m):
    """The 8B's linears (qkv, o, gate_up, down) through _scaled_mm against the reference."""
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
        x = _randn(m, k, dtype=torch.bfloat16, device="cuda", seed=m)
        w = _randn(n, k, dtype=torch.bfloat16, device="cuda", seed=n, scale=0.02)
        xq, xs = quantize_fp8(x)
        wq, ws = R.quantize_fp8(w)
        out = fp8_linear(xq, xs, wq, ws.view(-1), None, torch.bfloat16)
        ref = R.fp8_linear(xq, xs, wq, ws.view(-1), None, torch.float32)
        assert rel_err(out.float(), ref) < 4e-3, (n, k)


@pytest.mark.gpu
def test_fused_fp8_ops_llama_shapes_gpu():
    dt = torch.bfloat16
    x = _randn(8192, 4096, dtype=dt, device="cuda", seed=1)
    w = _randn(4096, dtype=dt, device="cuda", seed=2)
    _same_fp8(rms_norm_quant_fp8(x, w, 1e-5), R.rms_norm_quant_fp8(x, w, 1e-5), max_mismatch=0.01)
    residual = _randn(8192, 4096, dtype=dt, device="cuda", seed=3)
    rq, rs, rres = R.fused_add_rms_norm_quant_fp8(x, residual, w, 1e-5)
    q, s, _ = fused_add_rms_norm_quant_fp8(x, residual, w, 1e-5)
    assert torch.equal(residual, rres)
    _same_fp8((q, s), (rq, rs), max_mismatch=0.01)
    gu = _randn(8192, 2 * 14336, dtype=dt, device="cuda", seed=4)
    _same_fp8(silu_and_mul_quant_fp8(gu), R.silu_and_mul_quant_fp8(gu), max_mismatch=0.01)
    _same_fp8(quantize_fp8(x), R.quantize_fp8(x))


@pytest.mark.gpu
@pytest.mark.parametrize("v_layout", ["row-major", "token-major"])
@pytest.mark.parametrize("batch,max_ctx", [(1, 8192), (256, 4096)])
def test_decode_fp8_cache_llama_shapes_gpu(batch, max_ctx, v_layout):
    lens = torch.randint(1, max_ctx + 1, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    g = torch.Generator().manual_seed(5)
    b = make_paged_batch([(1, n) for n in lens], num_heads=32, num_kv_heads=8, head_dim=128,
                         dtype=torch.bfloat16, device="cuda", generator=g)
    kv_scale = (0.02, 0.01)
    b.k_cache, b.v_cache = R.to_fp8(b.k_cache, kv_scale[0]), R.to_fp8(b.v_cache, kv_scale[1])
    v = b.v_cache if v_layout == "row-major" else b.v_cache.transpose(2, 3).contiguous().transpose(2, 3)
    out = A.paged_attention(b.q, b.k_cache, v, b.block_tables, b.query_start_loc, b.seq_lens,
                            128**-0.5, max_query_len=1, kv_scale=kv_scale)
    ref = R.paged_attention(b.q.float(), b.k_cache.float() * kv_scale[0], b.v_cache.float() * kv_scale[1],
                            b.block_tables, b.query_start_loc, b.seq_lens, 128**-0.5)
    assert rel_err(out, ref) < 1e-2
