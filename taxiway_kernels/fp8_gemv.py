"""Small-M FP8 W8A8 GEMM (M = 1 ... 64, decode): y[M, N] = (xq * x_scale) @ (w * w_scale[:, None]).T
(+ bias). Reference: taxiway_kernels.reference.fp8_linear; taxiway_kernels.fp8_gemm.fp8_linear dispatches here.

At small M the GEMM is bound by reading the weight's N * K bytes, and torch._scaled_mm with rowwise
scales is no faster there than BF16 F.linear (bench/results/2026-12-01-callA-fp8-gemm-h200.json).
Two paths (`choose_config`):

- mma: the product is computed transposed, y.T = W x.T, so a [BLOCK_N, BLOCK_K] weight tile
  fills the MMA's M side and x's tile (M padded to 16 ... 64) its small N side; both operands
  stay FP8 (wgmma on sm_90), accumulated in float32, the scales applied in the epilogue.
- gemv (M small, CUDA cores): each program converts a weight tile to float32 in registers and
  multiplies one row of x; an alternative that bench/fp8_gemm.py times beside the mma path.

Both split K until there are about two programs per multiprocessor: float32 partials go to a
[SPLIT_K, M, N] workspace and are summed in split order (deterministic, unlike atomic adds), by
w4a16's reduction kernel (reduce="kernel") or, saving that launch, by whichever split of a tile
finishes last (reduce="last_split": one int32 counter per tile, which that split resets to 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from taxiway_kernels import _triton_compat as C
from taxiway_kernels.fp8_gemm import check_gemm
from taxiway_kernels.w4a16 import _split, _split_k_reduce_kernel, store_tile

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_BLOCK_K = 256
TILE_COUNTERS = 1 << 16  # reduce="last_split": counters per device, one per (N tile, M tile)
_counters: dict[torch.device, torch.Tensor] = {}  # [TILE_COUNTERS] int32, zero between calls


@dataclass(frozen=True)
class FP8SmallMConfig:
    """How one call runs; `choose_config` picks it, benchmarks pass their own."""

    path: str = "mma"  # "mma" (tensor cores, y.T = W x.T) | "gemv" (CUDA cores, one x row a program)
    block_m: int = 16  # x rows per tile: the MMA's N side (mma only; at least 16)
    block_n: int = 64  # weight rows per tile: the MMA's M side
    block_k: int = 256  # must divide K
    split_k: int = 1  # K slices, summed in a float32 workspace
    reduce: str = "kernel"  # who sums the splits: "kernel" (a second launch) | "last_split" (in kernel)
    num_warps: int = 4
    num_stages: int = 4  # loads in flight per program: num_stages x (block_n + block_m) x block_k bytes

    def __post_init__(self) -> None:
        if self.path not in ("mma", "gemv"):
            raise ValueError(f"path must be mma or gemv, got {self.path!r}")
        if self.reduce not in ("kernel", "last_split"):
            raise ValueError(f"reduce must be kernel or last_split, got {self.reduce!r}")
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.path == "mma" and (min(self.block_m, self.block_n) < 16 or self.block_k < MIN_MMA_BLOCK_K):
            raise ValueError(f"mma tiles need block_m, block_n >= 16 and block_k >= {MIN_MMA_BLOCK_K} "
                             f"(FP8 tensor-core dots), got {self.block_m}, {self.block_n}, {self.block_k}")
        if self.split_k < 1 or self.num_stages < 1:
            raise ValueError(f"split_k and num_stages must be positive, got {self.split_k}, {self.num_stages}")


# ---------------------------------------------------------------- device code


@triton.jit
def _epilogue(acc, m, n, M, N, xs_ptr, s_xs, ws_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr, s_om,
              HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, LAST_SPLIT_REDUCES: tl.constexpr):
    """acc [BM, BN] f32 of rows m, columns n, scaled by x_scale[m] * w_scale[n], then stored
    (to out, or to this split's slice of the workspace, which the last split may then sum)."""
    xs = tl.load(xs_ptr + m.to(tl.int64) * s_xs, mask=m < M, other=0.0)
    acc = acc * xs[:, None] * tl.load(ws_ptr + n, mask=n < N, other=0.0)[None, :]
    store_tile(acc, m, n, M, N, b_ptr, out_ptr, part_ptr, s_om, tl.program_id(2), HAS_BIAS, SPLIT_K)
    if SPLIT_K > 1 and LAST_SPLIT_REDUCES:
        _sum_if_last_split(m, n, M, N, b_ptr, out_ptr, part_ptr, cnt_ptr, s_om, HAS_BIAS, SPLIT_K)


@triton.jit
def _sum_if_last_split(m, n, M, N, b_ptr, out_ptr, part_ptr, cnt_ptr, s_om, HAS_BIAS: tl.constexpr,
                       SPLIT_K: tl.constexpr):
    """The split that finishes its tile last sums the tile's SPLIT_K partials in split order and
    resets the tile's counter. The pattern of CUTLASS's semaphore: a CTA barrier, then one
    thread's release (its acquire on the reading side), partials read from L2 (.cg)."""
    cnt = cnt_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.debug_barrier()  # every thread's partial is stored before the count moves
    if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
        mask = (m < M)[:, None] & (n < N)[None, :]
        part = part_ptr + m.to(tl.int64)[:, None] * N + n[None, :]
        acc = tl.load(part, mask=mask, other=0.0, cache_modifier=".cg")
        for s in tl.static_range(1, SPLIT_K):
            acc += tl.load(part + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
        store_tile(acc, m, n, M, N, b_ptr, out_ptr, part_ptr, s_om, 0, HAS_BIAS, 1)
        tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")


@triton.jit
def _fp8_mma_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, s_xs, s_om, k_per_split,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, LAST_SPLIT_REDUCES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), SPLIT_K); x [M, K] and w [N, K] contiguous, K a
    multiple of BLOCK_K and k_per_split of BLOCK_K (no K masks: 16-byte loads)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n.to(tl.int64)[:, None] * K + kk[None, :]
    x_rows = x_ptr + m.to(tl.int64)[:, None] * K + kk[None, :]
    n_ok, m_ok = (n < N)[:, None], (m < M)[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    k_lo = tl.program_id(2) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w = tl.load(w_rows + k0, mask=n_ok, other=0.0)  # [BN, BK] fp8
        x = tl.load(x_rows + k0, mask=m_ok, other=0.0)  # [BM, BK] fp8
        # Hopper's FP8 MMA adds into a reduced-precision accumulator; promote to float32 each tile.
        acc = tl.dot(w, tl.trans(x), acc, max_num_imprecise_acc=BLOCK_K)
    _epilogue(tl.trans(acc), m, n, M, N, xs_ptr, s_xs, ws_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr, s_om,
              HAS_BIAS, SPLIT_K, LAST_SPLIT_REDUCES)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, s_xs, s_om, k_per_split,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, LAST_SPLIT_REDUCES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), M, SPLIT_K): row m of x against BLOCK_N weight rows, in float32 on
    CUDA cores; products are summed per lane and reduced across K once, after the loop."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1) + tl.arange(0, 1)
    kk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n.to(tl.int64)[:, None] * K + kk[None, :]
    x_row = x_ptr + tl.program_id(1).to(tl.int64) * K + kk
    n_ok = (n < N)[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    k_lo = tl.program_id(2) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w = tl.load(w_rows + k0, mask=n_ok, other=0.0).to(tl.float32)
        acc += w * tl.load(x_row + k0).to(tl.float32)[None, :]
    _epilogue(tl.sum(acc, axis=1)[None, :], m, n, M, N, xs_ptr, s_xs, ws_ptr, b_ptr, out_ptr,
              part_ptr, cnt_ptr, s_om, HAS_BIAS, SPLIT_K, LAST_SPLIT_REDUCES)


# ---------------------------------------------------------------- host side


MIN_MMA_BLOCK_K = 32  # Triton's FP8 dot on the GPU takes K tiles of 32 or more (the interpreter takes 16)


def _block_k(k: int, cap: int = MAX_BLOCK_K) -> int:
    """The largest power of two <= cap that divides K (K is a multiple of 16)."""
    b = cap
    while k % b:
        b //= 2
    return b


def choose_config(m: int, n: int, k: int, device: torch.device) -> FP8SmallMConfig:
    """Tiles for one small-M call (static heuristics; bench/fp8_gemm.py --sweep times the others).
    A K with no tile of 32 (an odd multiple of 16) takes the gemv path."""
    block_m = max(16, triton.next_power_of_2(m))
    block_n, block_k = 64, _block_k(k)
    if block_k < MIN_MMA_BLOCK_K:
        return FP8SmallMConfig("gemv", block_n=16, block_k=block_k,
                               split_k=_split(triton.cdiv(n, 16) * m, 1, k, block_k, C.sm_count(device)))
    split = _split(triton.cdiv(n, block_n) * triton.cdiv(m, block_m), 1, k, block_k, C.sm_count(device))
    stages = 4 if block_m <= 32 else 3  # (64 + 64) x 256 bytes a stage at M = 64
    return FP8SmallMConfig("mma", block_m=block_m, block_n=block_n, block_k=block_k, split_k=split,
                           num_warps=4, num_stages=stages)


def _check(xq, x_scale, weight, weight_scale, bias, out_dtype) -> None:
    check_gemm(xq, x_scale, weight, weight_scale, any_n=True)
    C.check_device("xq", xq, xq.device)
    C.check_dtype("out_dtype", torch.empty(0, dtype=out_dtype), OUT_DTYPES)
    C.check_last_dim_contiguous("weight_scale", weight_scale)
    if bias is not None:
        C.check_device("bias", bias, xq.device)
        C.check_shape("bias", bias, (weight.shape[0],))
        C.check_last_dim_contiguous("bias", bias)
        if bias.dtype != out_dtype:
            raise ValueError(f"bias has dtype {bias.dtype}, expected out_dtype {out_dtype}")


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The device's zeroed tile counters (made on its first last_split call, which must not be
    inside a CUDA graph capture: the engine runs each forward once before capturing it)."""
    if tiles > TILE_COUNTERS:
        raise ValueError(f"reduce='last_split' counts at most {TILE_COUNTERS} tiles, this call has "
                         f"{tiles}: use reduce='kernel' or larger tiles")
    cnt = _counters.get(device)
    if cnt is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("reduce='last_split' makes its tile counters on the first call; "
                               "make one call outside the CUDA graph capture first")
        cnt = _counters[device] = torch.zeros(TILE_COUNTERS, dtype=torch.int32, device=device)
    return cnt


def _check_config(cfg: FP8SmallMConfig, k: int) -> None:
    if k == 0 or k % cfg.block_k:
        raise ValueError(f"block_k {cfg.block_k} must divide K = {k} (K > 0)")


def fp8_linear_small_m(
    xq: torch.Tensor,  # [M, K] float8_e4m3fn, contiguous; K a multiple of 16
    x_scale: torch.Tensor,  # [M, 1] f32 (per token, or a static scale expanded)
    weight: torch.Tensor,  # [N, K] float8_e4m3fn, contiguous (any N)
    weight_scale: torch.Tensor,  # [N] f32
    bias: torch.Tensor | None = None,  # [N], out_dtype
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    config: FP8SmallMConfig | None = None,
) -> torch.Tensor:  # [M, N] out_dtype
    """y = (xq * x_scale) @ (weight * weight_scale[:, None]).T + bias, accumulated in f32."""
    _check(xq, x_scale, weight, weight_scale, bias, out_dtype)
    (m, k), n = xq.shape, weight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    cfg = config or choose_config(m, n, k, xq.device)
    _check_config(cfg, k)
    split = min(cfg.split_k, k // cfg.block_k)
    k_per_split = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    part = torch.empty((split, m, n), dtype=torch.float32, device=xq.device) if split > 1 else out
    b = bias if bias is not None else weight_scale  # unread placeholder
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m) if cfg.path == "mma" else m, split)
    in_kernel = split > 1 and cfg.reduce == "last_split"
    cnt = _tile_counters(xq.device, grid[0] * grid[1]) if in_kernel else weight_scale  # else unread
    args = (xq, x_scale, weight, weight_scale, b, out, part, cnt, m, n, k, x_scale.stride(0),
            out.stride(0), k_per_split)
    common = dict(HAS_BIAS=bias is not None, SPLIT_K=split, LAST_SPLIT_REDUCES=in_kernel,
                  BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    if cfg.path == "mma":
        _fp8_mma_kernel[grid](*args, BLOCK_M=cfg.block_m, **common)
    else:
        _fp8_gemv_kernel[grid](*args, **common)
    if split > 1 and not in_kernel:
        block = min(1024, triton.next_power_of_2(n))
        _split_k_reduce_kernel[(m, triton.cdiv(n, block))](
            part, b, out, m, n, out.stride(0), SPLIT_K=split, HAS_BIAS=bias is not None,
            BLOCK=block, num_warps=4)
    return out
