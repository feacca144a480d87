"""rope_and_write_kv against taxiway_kernels.reference.rope_and_write_kv."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from taxiway_kernels import reference as R  # noqa: E402
from taxiway_kernels.rotary import rope_and_write_kv  # noqa: E402
from taxiway_kernels.testing import make_cos_sin_cache, rel_err  # noqa: E402

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _inputs(num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed,
            pad_every=0):
    """q, k, v as strided views into one fused [T, (H + 2 KVH) * D] qkv tensor, a random cache
    (never zeros) and scattered slots; every pad_every-th token gets slot -1."""
    g = torch.Generator().manual_seed(seed)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=g).to(dtype).to(device)
    q, k, v = qkv.view(num_tokens, -1, head_dim).split([num_heads, num_kv_heads, num_kv_heads], 1)
    num_blocks = num_tokens // block_size + 3
    cache_shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k_cache = torch.randn(cache_shape, generator=g).to(dtype).to(device)
    v_cache = torch.randn(cache_shape, generator=g).to(dtype).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    if pad_every:
        slots[::pad_every] = -1
    positions = torch.randint(0, 4096, (num_tokens,), generator=g)
    cos_sin = make_cos_sin_cache(4096, head_dim)
    return (q, k, v, positions.to(device), cos_sin.to(device), k_cache, v_cache,
            slots.to(device))


def _run_both(args):
    """Runs the kernel on args and the reference on clones; returns (kernel, reference) outputs."""
    q, k, v, positions, cos_sin, k_cache, v_cache, slots = args
    ref = [q.clone(), k, v, positions, cos_sin, k_cache.clone(), v_cache.clone(), slots]
    R.rope_and_write_kv(*ref)
    k_before = k.clone()
    rope_and_write_kv(*args)
    assert torch.equal(k, k_before), "k must be left unchanged"
    return (q, k_cache, v_cache), (ref[0], ref[5], ref[6])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 80])
@pytest.mark.parametrize("heads", [(8, 2), (6, 6), (12, 3)])
def test_rope_and_write_kv(dtype, head_dim, heads, device):
    args = _inputs(13, *heads, head_dim, 16, dtype, device, seed=head_dim + heads[0],
                   pad_every=5)
    out, ref = _run_both(args)
    for name, o, r in zip(("q", "k_cache", "v_cache"), out, ref):
        err = rel_err(o.cpu(), r.cpu())
        assert err < TOL[dtype], f"{name}: {err:.2e}"
    assert torch.equal(out[2], ref[2]), "v is copied bit for bit, padding slots skipped"


@pytest.mark.parametrize("block_size", [8, 32])
def test_rope_block_sizes_exact_f32(block_size, device):
    args = _inputs(40, 4, 2, 64, block_size, torch.float32, device, seed=block_size, pad_every=3)
    out, ref = _run_both(args)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)


def test_rope_rejects_bad_inputs(device):
    args = list(_inputs(4, 4, 2, 64, 16, torch.float16, device, seed=0))
    bad = list(args)
    bad[7] = bad[7].int()
    with pytest.raises(ValueError, match="slot_mapping has dtype"):
        rope_and_write_kv(*bad)
    bad = list(args)
    bad[4] = bad[4][:, :32]
    with pytest.raises(ValueError, match="cos_sin_cache must be"):
        rope_and_write_kv(*bad)
    bad = list(args)
    bad[5] = bad[5][:, :1]
    with pytest.raises(ValueError, match="k_cache must be"):
        rope_and_write_kv(*bad)


@pytest.mark.gpu
def test_rope_llama_shapes_gpu():
    args = _inputs(8192, 32, 8, 128, 16, torch.bfloat16, "cuda", seed=1, pad_every=97)
    out, ref = _run_both(args)
    for o, r in zip(out, ref):
        assert rel_err(o, r) < TOL[torch.bfloat16]
