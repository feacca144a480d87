"""Paged attention kernels against taxiway_kernels.reference.paged_attention (computed in float64)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from taxiway_kernels import _triton_compat as C  # noqa: E402
from taxiway_kernels import reference as R  # noqa: E402
from taxiway_kernels import triton_attention as A  # noqa: E402
from taxiway_kernels.testing import PagedBatch, make_paged_batch, rel_err  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def _reference(b: PagedBatch, scale: float, window: int | None) -> torch.Tensor:
    """[T, H, D]: float64 on the CPU; float32 on the GPU (large shapes), far under bf16's error."""
    up = torch.float32 if b.q.is_cuda else torch.float64
    return R.paged_attention(
        b.q.to(up), b.k_cache.to(up), b.v_cache.to(up), b.block_tables, b.query_start_loc,
        b.seq_lens, scale, sliding_window=window)


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "some output was not written (NaN poison left)"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"|out - ref| / |ref| = {err:.2e} over {TOL[dtype]:.0e}"


def _batch(seqs, group, head_dim, dtype, device, seed, num_kv_heads=2, block_size=16):
    g = torch.Generator().manual_seed(seed)
    return make_paged_batch(seqs, num_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
                            head_dim=head_dim, block_size=block_size, dtype=dtype,
                            device=device, generator=g)


DECODE_SEQS = [(1, 1), (1, 15), (1, 16), (1, 17), (1, 70), (1, 133)]  # 133: 9 shuffled blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode(dtype, head_dim, group, num_splits, device):
    b = _batch(DECODE_SEQS, group, head_dim, dtype, device, seed=group * 1000 + head_dim)
    scale = head_dim**-0.5
    out = torch.full_like(b.q, float("nan"))
    A.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc,
                             b.seq_lens, scale, out=out, num_splits=num_splits)
    _check(out, _reference(b, scale, None), dtype)


@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("window", [None, 20])
def test_decode_block_sizes_and_window(block_size, window, device):
    b = _batch(DECODE_SEQS, 4, 64, torch.float16, device, seed=block_size, block_size=block_size)
    out = torch.full_like(b.q, float("nan"))
    A.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc,
                             b.seq_lens, 0.125, out=out, sliding_window=window, num_splits=4,
                             block_n=16)
    _check(out, _reference(b, 0.125, window), torch.float16)


MIXED = [(1, 40), (1, 97), (1, 16), (13, 61), (40, 40), (5, 5), (37, 120), (1, 33)]
# decodes, a chunk with a cached prefix, fresh prefills, a long chunk over many blocks, and a
# trailing q_len-1 sequence handled by the prefill kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_mixed_batch(dtype, head_dim, group, device):
    b = _batch(MIXED, group, head_dim, dtype, device, seed=7 * group + head_dim)
    assert b.num_decodes == 3
    scale = head_dim**-0.5
    out = torch.full_like(b.q, float("nan"))
    A.paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens,
                      scale, out=out, num_decodes=b.num_decodes, max_query_len=b.max_query_len)
    _check(out, _reference(b, scale, None), dtype)


@pytest.mark.parametrize("window", [1, 24, 64])
@pytest.mark.parametrize("num_decodes", [0, 3])
def test_mixed_batch_sliding_window(window, num_decodes, device):
    b = _batch(MIXED, 4, 64, torch.float32, device, seed=window)
    out = torch.full_like(b.q, float("nan"))
    A.paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens,
                      0.125, out=out, sliding_window=window, num_decodes=num_decodes)
    _check(out, _reference(b, 0.125, window), torch.float32)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (64, 32)])
@pytest.mark.parametrize("block_size", [8, 16, 64])
def test_prefill_tile_shapes(block_m, block_n, block_size, device):
    """Small tiles: many query tiles per sequence and KV tiles that straddle cache blocks."""
    seqs = [(1, 9), (17, 50), (33, 33), (3, 100)]
    b = _batch(seqs, 2, 64, torch.float32, device, seed=block_m + block_size, block_size=block_size)
    out = torch.full_like(b.q, float("nan"))
    A.paged_prefill_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc,
                              b.seq_lens, 0.125, out=out, block_m=block_m, block_n=block_n)
    _check(out, _reference(b, 0.125, None), torch.float32)


def test_qkv_views_and_padded_rows(device):
    """q is a strided view into a fused qkv output; rows past the batch's tokens stay untouched."""
    b = _batch(MIXED, 4, 64, torch.bfloat16, device, seed=3)
    num_tokens, num_heads, head_dim = b.q.shape
    qkv = torch.randn(num_tokens + 5, (num_heads + 4) * head_dim, device=device).to(b.q.dtype)
    q = qkv[:, : num_heads * head_dim].view(-1, num_heads, head_dim)
    q[:num_tokens] = b.q
    out = torch.full((num_tokens + 5, num_heads, head_dim), float("nan"), device=device,
                     dtype=b.q.dtype)
    A.paged_attention(q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens,
                      0.125, out=out, num_decodes=b.num_decodes)
    _check(out[:num_tokens], _reference(b, 0.125, None), torch.bfloat16)
    assert out[num_tokens:].isnan().all()


def test_all_decodes_through_max_query_len(device):
    b = _batch(DECODE_SEQS, 4, 64, torch.float32, device, seed=11)
    out = torch.full_like(b.q, float("nan"))
    A.paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens,
                      0.125, out=out, max_query_len=1)
    _check(out, _reference(b, 0.125, None), torch.float32)


def test_choose_num_splits():
    cpu = torch.device("cpu")  # 4 "SMs" off CUDA
    assert A.choose_num_splits(1, 1, cpu) == 16
    assert A.choose_num_splits(256, 8, cpu) == 1
    assert 1 <= A.choose_num_splits(3, 2, cpu) <= 64


# ---- token-major V (each block's tokens contiguous per dimension; the FP8 cache's candidate layout) ----

def _token_major(v_cache: torch.Tensor) -> torch.Tensor:
    """The same values, stored [num_blocks, num_kv_heads, head_dim, block_size], viewed as usual."""
    return v_cache.transpose(2, 3).contiguous().transpose(2, 3)


@pytest.mark.parametrize("kv", ["model", "fp8"])
@pytest.mark.parametrize("block_size,window,num_splits", [(16, None, 1), (16, None, 3), (8, 20, 4), (32, 37, 2)])
def test_decode_token_major_v_equals_row_major(kv, block_size, window, num_splits, device):
    """Same output from either V layout, with splits (their starts block-aligned or not, under a
    window) and partial last blocks; the token-major path reads K and V unmasked, so slots past
    every context hold NaN in K (their scores are masked) and a large finite value in V (p = 0
    there must keep them out)."""
    b = _batch(DECODE_SEQS, 4, 64, torch.bfloat16, device, seed=block_size + num_splits, block_size=block_size)
    used = torch.zeros(b.v_cache.shape[0], block_size, dtype=torch.bool)  # [block, offset]
    for row, n in zip(b.block_tables.cpu(), b.seq_lens.cpu().tolist()):
        used[row.long()[torch.arange(n) // block_size], torch.arange(n) % block_size] = True
    b.v_cache.permute(0, 2, 1, 3)[~used.to(b.v_cache.device)] = 400.0  # every slot no context reads
    b.k_cache.permute(0, 2, 1, 3)[~used.to(b.k_cache.device)] = float("nan")  # K loads unmasked: scores masked
    if kv == "fp8":
        b.k_cache, b.v_cache = (c.to(torch.float8_e4m3fn) for c in (b.k_cache, b.v_cache))
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens, 0.125)
    kw = dict(sliding_window=window, num_splits=num_splits, block_n=16 if block_size < 16 else None)
    row_major = A.paged_decode_attention(*args, **kw)
    tm = _token_major(b.v_cache)
    assert tm.stride(2) == 1 and C.v_token_major(tm)
    token_major = A.paged_decode_attention(*args[:2], tm, *args[3:], **kw)
    assert not token_major.isnan().any()
    assert rel_err(token_major, row_major) < 1e-3
    ref = R.paged_attention(b.q.double(), b.k_cache.double(), b.v_cache.double(), b.block_tables,
                            b.query_start_loc, b.seq_lens, 0.125, sliding_window=window)
    assert rel_err(token_major, ref) < 1e-2


@pytest.mark.parametrize("window", [None, 20, 37])
def test_prefill_reads_a_token_major_v(window, device):
    """Full tiles, the masked diagonal tiles and, under a sliding window, the masked loop started
    on the block boundary below the window's first position."""
    b = _batch(MIXED, 4, 64, torch.float32, device, seed=5)
    out = torch.full_like(b.q, float("nan"))
    A.paged_attention(b.q, b.k_cache, _token_major(b.v_cache), b.block_tables, b.query_start_loc, b.seq_lens,
                      0.125, out=out, num_decodes=b.num_decodes, sliding_window=window)
    _check(out, _reference(b, 0.125, window), torch.float32)


def test_v_cache_of_another_layout_is_refused(device):
    b = _batch([(1, 5)], 4, 64, torch.float16, device, seed=0)
    wide = torch.zeros(*b.v_cache.shape[:3], 2 * b.v_cache.shape[3], dtype=b.v_cache.dtype, device=device)
    with pytest.raises(ValueError, match="v_cache must have contiguous head_dim, or tokens contiguous"):
        A.paged_decode_attention(b.q, b.k_cache, wide[..., ::2], b.block_tables, b.query_start_loc,
                                 b.seq_lens, 0.1)


def _args(b: PagedBatch) -> list:
    return [b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens, 0.1]


def _strided_last_dim(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, -1).contiguous().transpose(0, -1)


BAD_INPUTS = [  # (argument index, how to spoil it, expected message)
    (3, lambda t: t.long(), "block_tables has dtype"),
    (4, lambda t: t.long(), "query_start_loc has dtype"),
    (5, lambda t: t[:-1], "seq_lens has shape"),
    (1, lambda t: t[..., :32], "head_dim"),
    (2, lambda t: t.float(), "v_cache has dtype"),
    (1, lambda t: t[:, :, :12], "block_size"),
    (0, lambda t: t[:, :7], "multiple of num_kv_heads"),
    (0, _strided_last_dim, "stride 1 in its last dim"),
]


@pytest.mark.parametrize("index,spoil,match", BAD_INPUTS)
def test_wrapper_rejects_bad_inputs(index, spoil, match, device):
    b = _batch([(1, 5), (4, 9)], 4, 64, torch.float16, device, seed=0)
    args = _args(b)
    args[index] = spoil(args[index])
    with pytest.raises(ValueError, match=match):
        A.paged_attention(*args, num_decodes=1)


def test_wrapper_rejects_bad_options(device):
    b = _batch([(1, 5), (4, 9)], 4, 64, torch.float16, device, seed=0)
    with pytest.raises(ValueError, match="sliding_window"):
        A.paged_attention(*_args(b), sliding_window=0)
    with pytest.raises(ValueError, match="num_decodes"):
        A.paged_attention(*_args(b), num_decodes=3)
    with pytest.raises(ValueError, match="num_splits"):
        A.paged_attention(*_args(b), num_decodes=1, num_splits=0)


# ---- GPU: Llama-3.1-8B shapes (32 heads, 8 KV heads, head_dim 128) ----

def _lengths(n: int, hi: int, seed: int) -> list[int]:
    return torch.randint(1, hi + 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("batch,max_ctx", [(1, 8192), (32, 8192), (256, 4096)])
def test_decode_llama_shapes_gpu(batch, max_ctx):
    seqs = [(1, n) for n in _lengths(batch, max_ctx, batch)]
    b = _batch(seqs, 4, 128, torch.bfloat16, "cuda", seed=batch, num_kv_heads=8)
    out = torch.full_like(b.q, float("nan"))
    A.paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens,
                      128**-0.5, out=out, max_query_len=1)
    _check(out, _reference(b, 128**-0.5, None), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 4096])
def test_mixed_llama_shapes_gpu(window):
    seqs = [(1, n) for n in _lengths(64, 8192, 1)]
    seqs += [(512, 512 + n) for n in _lengths(4, 3000, 2)] + [(1024, 1024)] * 2 + [(300, 300)]
    b = _batch(seqs, 4, 128, torch.bfloat16, "cuda", seed=5, num_kv_heads=8)
    out = torch.full_like(b.q, float("nan"))
    A.paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens,
                      128**-0.5, out=out, num_decodes=b.num_decodes, sliding_window=window)
    _check(out, _reference(b, 128**-0.5, window), torch.bfloat16)


@pytest.mark.gpu
def test_decode_cuda_graph_replay_gpu():
    """Captured once; new lengths and block tables written in place; replay matches."""
    seqs = [(1, n) for n in _lengths(16, 2048, 3)]
    b = _batch(seqs, 4, 128, torch.bfloat16, "cuda", seed=9, num_kv_heads=8)
    out = torch.full_like(b.q, float("nan"))
    args = _args(b)[:6]

    def run():
        A.paged_attention(*args, 128**-0.5, out=out, max_query_len=1, num_splits=8)

    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for seed in (1, 2):
        # New lengths must stay within the table's width (the kernel's contract).
        new_lens = torch.tensor(_lengths(16, 2048, 10 + seed), dtype=torch.int32)
        new_lens.clamp_(max=b.block_tables.shape[1] * 16)
        b.seq_lens.copy_(new_lens)
        # Rows padded with block 0 still index real blocks, and the reference reads the same table.
        b.block_tables.copy_(b.block_tables[torch.randperm(16)])
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, _reference(b, 128**-0.5, None), torch.bfloat16)
