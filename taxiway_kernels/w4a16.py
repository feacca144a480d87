"""W4A16 GEMM: y[M, N] = x[M, K] @ dequant(W)[N, K].T (+ bias), W 4-bit group-wise (reference and
layout: taxiway_kernels/w4a16_reference.py). Three paths (`choose_config` picks by M and dtype):

- gemv (M = 1; the default on float32 x). Each program owns BLOCK_N output rows and reads them as
  long coalesced runs; codes are dequantized in registers and never written: per group,
  y += scale * (sum_k code * x - zero * sum_k x). Optional split-K (partials in a float32
  workspace, then a reduction kernel) when the rows alone give too few programs.
- mm (M < DEQUANT_MIN_M; M = 1 too on 16-bit x): tensor cores on tiles dequantized in registers
  ((code - zero) * scale, rounded to x's dtype, as every AWQ kernel does). For small M the
  product is computed transposed (y.T = W x.T), so the weight tile fills the MMA's M side and a
  16-row x tile the small side; the same split-K as above.
- dequant (M >= DEQUANT_MIN_M, prefill-sized): dequantize W once into a dense [N, K] buffer and run
  cuBLAS through F.linear; the dequantization is a few percent of a GEMM this large.

Decode-sized calls are bound by the instructions that unpack each code, not by HBM, unless the
unpacking avoids int->float conversion: taxiway_kernels/w4a16_unpack.py says how (`unpack="fast"`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from taxiway_kernels import _triton_compat as C
from taxiway_kernels.w4a16_reference import W4A16Weight
from taxiway_kernels.w4a16_unpack import (ASM, I2F, MAGIC, UNPACK_MODES, dequant_tile, magic_f32, pair_order, unpack8,
                                  word_dots)

DEQUANT_MIN_M = 1024  # from M on, dequantize + cuBLAS (bench/w4a16.py measures every path at every M)


@dataclass(frozen=True)
class W4A16Config:
    """How one call runs; `choose_config` picks it, benchmarks pass their own."""

    path: str  # "gemv" | "mm" | "dequant"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    swap_ab: bool = False
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    unpack: str = "fast"  # "fast": no int->float conversion (module docstring); "i2f": the old one

    def __post_init__(self) -> None:
        if self.path not in ("gemv", "mm", "dequant"):
            raise ValueError(f"path must be gemv, mm or dequant, got {self.path!r}")
        if self.unpack not in UNPACK_MODES:
            raise ValueError(f"unpack must be one of {UNPACK_MODES}, got {self.unpack!r}")
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be positive, got {self.split_k}")


# ---------------------------------------------------------------- device code


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, N, K, s_qn, s_sn, s_zn, k_per_split,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNPACK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), SPLIT_K); x is [K] (M = 1). BLOCK_K is a multiple of GROUP; EVEN_K:
    BLOCK_K divides K (then also k_per_split, a multiple of BLOCK_K).
    Per group, y += s * (sum code * x - z * sum x); the x side is computed once per word."""
    BW: tl.constexpr = BLOCK_K // 8  # packed words per block
    GPB: tl.constexpr = BLOCK_K // GROUP  # groups per block
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    n64 = n.to(tl.int64)
    wi = tl.arange(0, BW)
    gi = tl.arange(0, GPB)
    k_lo = tl.program_id(1) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_N, GPB], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        words = tl.max_contiguous(tl.multiple_of(k0 // 8 + wi, BW), BW)  # 16-byte loads
        if EVEN_K:  # every block lies inside [k_lo, k_hi): a mask along K would split the loads
            w_ok = wi < BW
        else:
            w_ok = words * 8 < k_hi  # [BW]
        p = tl.load(qw_ptr + n64[:, None] * s_qn + words[None, :], mask=n_ok[:, None] & w_ok[None, :],
                    other=0)
        xt = tl.load(x_ptr + words[:, None] * 8 + tl.arange(0, 8)[None, :], mask=w_ok[:, None], other=0.0)
        dots, xsum = word_dots(p, xt.to(tl.float32), UNPACK)
        dots = tl.sum(tl.reshape(dots, (BLOCK_N, GPB, GROUP // 8)), axis=2)  # [BN, GPB]
        xsum = tl.sum(tl.reshape(xsum, (GPB, GROUP // 8)), axis=1)  # [GPB]
        g = k0 // GROUP + gi
        m2 = n_ok[:, None] & (g * GROUP < k_hi)[None, :]
        s = tl.load(s_ptr + n64[:, None] * s_sn + g[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + n64[:, None] * s_zn + g[None, :], mask=m2, other=0).to(tl.int32)
            acc += s * (dots - (magic_f32(z) - 8388608.0) * xsum[None, :])
        else:
            acc += s * (dots - 8.0 * xsum[None, :])
    y = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + n, y.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(ws_ptr + tl.program_id(1) * N + n, y, mask=n_ok)


@triton.jit
def _mm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, M, N, K, s_xm, s_om, s_qn, s_sn, s_zn,
    k_per_split,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, IEEE: tl.constexpr, UNPACK: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K). GROUP is a multiple of BLOCK_K, so a
    K tile has one scale (and zero) per row; tiles are visited GROUP_M row-tiles at a time (L2)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    n64 = n.to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    kw = tl.arange(0, BLOCK_K // 8)
    x_rows = x_ptr + m.to(tl.int64)[:, None] * s_xm
    w_rows = qw_ptr + n64[:, None] * s_qn
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_lo = tl.program_id(1) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):  # K is a multiple of GROUP, hence of BLOCK_K
        x = tl.load(x_rows + k0 + kk[None, :], mask=m_ok[:, None], other=0.0)  # [BM, BK]
        kw0 = tl.max_contiguous(tl.multiple_of(k0 // 8 + kw, BLOCK_K // 8), BLOCK_K // 8)
        p = tl.load(w_rows + kw0[None, :], mask=n_ok[:, None], other=0)  # [BN, BK/8]
        g = k0 // GROUP
        s = tl.load(s_ptr + n64 * s_sn + g, mask=n_ok, other=0.0)
        if HAS_ZEROS:
            z = tl.load(z_ptr + n64 * s_zn + g, mask=n_ok, other=0).to(tl.int32)
        else:
            z = tl.full([BLOCK_N], 8, tl.int32)
        w = dequant_tile(p, s, z, BLOCK_N, BLOCK_K // 8, UNPACK)  # [BN, BK] x's dtype
        if UNPACK != I2F:  # the weight tile's columns come in pair order
            x = pair_order(x, BLOCK_M, BLOCK_K)
        if SWAP_AB:
            if IEEE:
                acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, tl.trans(x), acc)
        else:
            if IEEE:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
    if SWAP_AB:
        acc = tl.trans(acc)  # [BM, BN]
    store_tile(acc, m, n, M, N, b_ptr, out_ptr, ws_ptr, s_om, tl.program_id(1), HAS_BIAS, SPLIT_K)


@triton.jit
def store_tile(acc, m, n, M, N, b_ptr, out_ptr, ws_ptr, s_om, split, HAS_BIAS: tl.constexpr,
               SPLIT_K: tl.constexpr):
    """acc [BM, BN] f32 of rows m, columns n: into out (+ bias, in out's dtype) with one split,
    else into slice `split` of the float32 workspace [SPLIT_K, M, N] (_split_k_reduce_kernel sums it)."""
    mask = (m < M)[:, None] & (n < N)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        dst = out_ptr + m.to(tl.int64)[:, None] * s_om + n[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ws = ws_ptr + (split * M + m.to(tl.int64))[:, None] * N + n[None, :]
        tl.store(ws, acc, mask=mask)


@triton.jit
def _split_k_reduce_kernel(ws_ptr, b_ptr, out_ptr, M, N, s_om, SPLIT_K: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (M, cdiv(N, BLOCK)): out[m] = sum over splits of ws[:, m] (+ bias), in out's dtype."""
    m = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = n < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + (s * M + m) * N + n, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * s_om + n, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, s_qn, s_sn, s_zn, HAS_ZEROS: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), K // BLOCK_K): out [N, K] = (code - zero) * scale in out's dtype."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    n64 = n.to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    p = tl.load(qw_ptr + n64[:, None] * s_qn + k0 // 8 + tl.arange(0, BLOCK_K // 8)[None, :],
                mask=n_ok[:, None], other=0)
    g = k0 // GROUP
    s = tl.load(s_ptr + n64 * s_sn + g, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + n64 * s_zn + g, mask=n_ok, other=0).to(tl.float32)
    else:
        z = tl.full([BLOCK_N], 8.0, tl.float32)
    w = (unpack8(p, BLOCK_N, BLOCK_K // 8).to(tl.float32) - z[:, None]) * s[:, None]
    dst = out_ptr + n64[:, None] * K + k0 + tl.arange(0, BLOCK_K)[None, :]
    tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


# ---------------------------------------------------------------- host side


def choose_config(
    m: int, n: int, k: int, group_size: int, device: torch.device, dtype: torch.dtype = torch.bfloat16
) -> W4A16Config:
    """The path and tiles for one call (static heuristics; bench/w4a16.py sweeps the alternatives)."""
    sms = C.sm_count(device)
    # Measured on an H200 (bench/results/2026-12-01-callK1-w4a16-h200.json, Llama-3.1-8B's linears):
    # at M = 1 the gemv with the fast unpack is the quickest path (1.6-2.1x BF16, 26-53% of the copy
    # bandwidth; the 16-row mm tile 0.9-1.0x), and at M = 16 the mm tile with the I2F unpack beats
    # the packed-pair asm (3-20%), though its loop issues fewer instructions per code.
    if m == 1:
        return gemv_config(n, k, group_size, device)
    if m >= DEQUANT_MIN_M:
        return W4A16Config("dequant", block_n=64, block_k=min(group_size, 128))
    if dtype == torch.float32:  # exact float32 dots (tests): smaller tiles keep registers
        return W4A16Config("mm", block_m=32, block_n=32, block_k=min(group_size, 32), num_warps=4,
                           num_stages=2)
    block_k = min(group_size, 128)
    if m <= 64:  # weight tile 8 KB (M <= 16) or 4 KB per stage, 4 stages
        block_m = max(16, triton.next_power_of_2(m))
        block_n = 128 if m <= 16 else 64
        return W4A16Config("mm", block_m=block_m, block_n=block_n, block_k=block_k, swap_ab=True,
                           num_warps=4, num_stages=4, split_k=_split(n, block_n, k, block_k, sms),
                           unpack="i2f")
    return W4A16Config("mm", block_m=128, block_n=128, block_k=min(group_size, 64), num_warps=8,
                       num_stages=3)


def gemv_config(n: int, k: int, group_size: int, device: torch.device) -> W4A16Config:
    """The gemv path's tiles (M = 1): 32 rows x up to 1024 k, 16 KB of codes per program and step,
    4 rows per thread; split-K to fill the multiprocessors."""
    block_n, block_k = 32, min(1024, max(group_size, triton.next_power_of_2(k) // 4))
    return W4A16Config("gemv", block_n=block_n, block_k=block_k, num_warps=4,
                       split_k=_split(n, block_n, k, block_k, C.sm_count(device)))


def _split(n: int, block_n: int, k: int, block_k: int, sms: int) -> int:
    """Split K until there are about two programs per multiprocessor (at most 8 splits)."""
    tiles = triton.cdiv(n, block_n)
    split = 1
    while tiles * split < 2 * sms and split < 8 and k // (2 * split) >= block_k:
        split *= 2
    return split


def _check(x: torch.Tensor, w: W4A16Weight, bias: torch.Tensor | None, out: torch.Tensor | None) -> None:
    C.check_device("x", x, x.device)
    C.check_dtype("x", x, C.FLOAT_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got {tuple(x.shape)}")
    C.check_last_dim_contiguous("x", x)
    if x.shape[1] != w.in_features:
        raise ValueError(f"x has K = {x.shape[1]}, expected the weight's in_features {w.in_features}")
    for name, t in (("qweight", w.qweight), ("scales", w.scales), ("zeros", w.zeros), ("bias", bias)):
        if t is not None:
            C.check_device(name, t, x.device)
            C.check_last_dim_contiguous(name, t)
    if w.scales.dtype != x.dtype:
        raise ValueError(f"scales has dtype {w.scales.dtype}, expected x's dtype {x.dtype}")
    if bias is not None:
        C.check_shape("bias", bias, (w.out_features,))
        if bias.dtype != x.dtype:
            raise ValueError(f"bias has dtype {bias.dtype}, expected x's dtype {x.dtype}")
    if out is not None:
        C.check_device("out", out, x.device)
        C.check_shape("out", out, (x.shape[0], w.out_features))
        C.check_last_dim_contiguous("out", out)
        if out.dtype != x.dtype:
            raise ValueError(f"out has dtype {out.dtype}, expected x's dtype {x.dtype}")


def _check_config(cfg: W4A16Config, m: int, group_size: int) -> None:
    if cfg.path == "gemv":
        if m != 1:
            raise ValueError(f"the gemv path takes M = 1, got M = {m}")
        if cfg.block_k % group_size:
            raise ValueError(f"gemv block_k {cfg.block_k} must be a multiple of group_size {group_size}")
    elif cfg.path == "mm" and (group_size % cfg.block_k or cfg.block_k < 16):
        raise ValueError(f"block_k {cfg.block_k} must be at least 16 and divide group_size {group_size}")
    if cfg.path == "mm" and (cfg.block_m < 16 or cfg.block_n < 16):
        raise ValueError(f"mm tiles need block_m, block_n >= 16, got {cfg.block_m}, {cfg.block_n}")


def _unpack_mode(cfg: W4A16Config, dtype: torch.dtype) -> int:
    """The kernels' UNPACK constexpr: ASM (inline PTX) on CUDA, for the mm path on 16-bit x; MAGIC
    (the same arithmetic in plain Triton) where the CPU interpreter runs, which cannot run PTX."""
    if cfg.unpack == "i2f":
        return I2F.value
    asm = not C.interpreting() and (cfg.path == "gemv" or dtype in (torch.float16, torch.bfloat16))
    return ASM.value if asm else MAGIC.value


def w4a16_linear(
    x: torch.Tensor,  # [M, K] float16 / bfloat16 / float32, last dim contiguous
    w: W4A16Weight,  # [N, K] 4-bit, scales in x's dtype
    bias: torch.Tensor | None = None,  # [N], x's dtype
    *,
    out: torch.Tensor | None = None,  # [M, N], x's dtype
    config: W4A16Config | None = None,
) -> torch.Tensor:
    """y = x @ dequant(w).T + bias, [M, N] in x's dtype (reference: taxiway_kernels.w4a16_reference.w4a16_linear)."""
    _check(x, w, bias, out)
    m, k = x.shape
    n = w.out_features
    out = x.new_empty((m, n)) if out is None else out
    if m == 0:
        return out
    cfg = config or choose_config(m, n, k, w.group_size, x.device, x.dtype)
    _check_config(cfg, m, w.group_size)
    if cfg.path == "dequant":
        dense = dequantize(w, x.dtype, config=cfg)
        return torch.matmul(x, dense.t(), out=out) if bias is None else torch.addmm(bias, x, dense.t(), out=out)
    split = min(cfg.split_k, max(1, k // cfg.block_k))
    k_per_split = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    zeros = w.zeros if w.zeros is not None else w.scales  # unread placeholder
    b = bias if bias is not None else w.scales  # unread placeholder
    s_zn = w.zeros.stride(0) if w.zeros is not None else 0
    common = dict(HAS_ZEROS=w.zeros is not None, HAS_BIAS=bias is not None, SPLIT_K=split,
                  GROUP=w.group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  UNPACK=_unpack_mode(cfg, x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.path == "gemv":
        _gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
            x, w.qweight, w.scales, zeros, b, out, ws, n, k, w.qweight.stride(0), w.scales.stride(0),
            s_zn, k_per_split, EVEN_K=k % cfg.block_k == 0, **common)
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        _mm_kernel[grid](
            x, w.qweight, w.scales, zeros, b, out, ws, m, n, k, x.stride(0), out.stride(0),
            w.qweight.stride(0), w.scales.stride(0), s_zn, k_per_split, SWAP_AB=cfg.swap_ab,
            BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m, IEEE=x.dtype == torch.float32, **common)
    if split > 1:
        block = min(1024, triton.next_power_of_2(n))
        _split_k_reduce_kernel[(m, triton.cdiv(n, block))](
            ws, b, out, m, n, out.stride(0), SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block,
            num_warps=4)
    return out


def dequantize(w: W4A16Weight, dtype: torch.dtype, *, config: W4A16Config | None = None) -> torch.Tensor:
    """The dense weight [N, K] in `dtype` (reference: taxiway_kernels.w4a16_reference.dequantize_w4a16)."""
    C.check_device("qweight", w.qweight, w.qweight.device)
    C.check_dtype("dtype", torch.empty(0, dtype=dtype), C.FLOAT_DTYPES)
    n, k = w.out_features, w.in_features
    block_n = config.block_n if config else 64
    block_k = min(config.block_k if config else 128, w.group_size)
    out = torch.empty((n, k), dtype=dtype, device=w.qweight.device)
    zeros = w.zeros if w.zeros is not None else w.scales
    _dequant_kernel[(triton.cdiv(n, block_n), k // block_k)](
        w.qweight, w.scales, zeros, out, n, k, w.qweight.stride(0), w.scales.stride(0),
        w.zeros.stride(0) if w.zeros is not None else 0, HAS_ZEROS=w.zeros is not None,
        GROUP=w.group_size, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out
