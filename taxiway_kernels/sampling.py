"""Token sampling from slot tables on the GPU: penalties, bans, temperature, top-k, top-p, min-p,
seeded Gumbel race and greedy rows in one pipeline, without sorting the vocabulary.

Semantics: taxiway_kernels/reference_sampling.py (the plain-torch reference the CPU runs). How: the kept
set of a row is always {score >= T}; a stats pass gives max and softmax mass, two pivot rounds
narrow T to a band of at most `band_cap` tokens, a gather pass counts what lies above the band and
copies the band out, and a finalize pass finds T exactly inside the band by a 16-way search over
its scores (or over the whole row, the slow path, when the checks show the band did not hold T),
draws the token and records it in the slot (position + 1, output count + 1). Noise is hashed from (key, position, token id) in
the kernels. Each pass reads the logits once (rows without top-k/top-p skip the pivot passes; rows
without any filter or greedy finish after the stats pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from taxiway_kernels import _sampling_finalize as F
from taxiway_kernels import _sampling_kernels as K
from taxiway_kernels import _triton_compat as C
from taxiway_kernels import reference_sampling as L


@dataclass(frozen=True)
class SamplingKernelConfig:
    """Tile sizes. A row's tokens depend only on the row and this config, never on the batch."""

    chunk: int = 8192
    """Vocabulary columns per program of the split passes (128,256 -> 16 programs per row)."""
    block: int = 1024
    """Columns per tile in the stats, gather, probs and slow passes."""
    pivot_block: int = 256
    """Columns per tile in the pivot passes (each compares against every pivot)."""
    pivots: int = 16
    """Pivots per round (a power of 2): each round narrows the band about pivots-1 times."""
    rounds: int = 2
    band_cap: int = 4096
    """Most band tokens a row copies out; a wider band takes the slow path."""
    band_block: int = 1024
    search_width: int = 16
    """Candidate thresholds per pass of the exact search (a power of 2; 16: 8 passes for 32 bits)."""
    rows_per_program: int = 1
    """Rows per program (1 on a GPU; more in the CPU interpreter, where programs are slow)."""
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("chunk", "block", "pivot_block", "pivots", "band_block", "search_width",
                     "rows_per_program"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of 2, got {v}")
        if self.chunk % self.block or self.chunk % self.pivot_block:
            raise ValueError(f"chunk ({self.chunk}) must be a multiple of block ({self.block}) "
                             f"and pivot_block ({self.pivot_block})")
        if self.pivots < 2 or self.rounds < 1 or self.band_cap < 1:
            raise ValueError(f"need pivots >= 2, rounds >= 1, band_cap >= 1; got {self.pivots}, "
                             f"{self.rounds}, {self.band_cap}")


class SamplingWorkspace:
    """Scratch memory of the sampling passes, grown to the largest batch seen (one per sampler).

    Per row: about chunks x (7 + 2 x rounds x pivots) x 4 B of records plus band_cap x 8 B of band
    buffer (37 KB at 128k vocabulary and the default config; 19 MB for 512 rows)."""

    def __init__(self, device: torch.device | str, cfg: SamplingKernelConfig = SamplingKernelConfig()):
        self.device = torch.device(device)
        self.cfg = cfg
        self.rows = 0
        self.chunks = 0

    def ensure(self, rows: int, chunks: int) -> None:
        if rows <= self.rows and chunks == self.chunks:
            return
        rows = max(rows, 2 * self.rows) if chunks == self.chunks else rows
        c, d = self.cfg, self.device
        f32, i32 = torch.float32, torch.int32
        self.wsf = torch.empty(rows * chunks * 4, dtype=f32, device=d)
        self.wsi = torch.empty(rows * chunks * 3, dtype=i32, device=d)
        self.wsc = torch.empty(c.rounds * rows * chunks * c.pivots, dtype=i32, device=d)
        self.wsm = torch.empty(c.rounds * rows * chunks * c.pivots, dtype=f32, device=d)
        self.wgf = torch.empty(rows * chunks * 2, dtype=f32, device=d)
        self.wgi = torch.empty(rows * chunks * 3, dtype=i32, device=d)
        self.wrf = torch.empty(rows * 4, dtype=f32, device=d)
        self.wri = torch.zeros(rows * 2, dtype=i32, device=d)
        self.bufv = torch.empty(rows * c.band_cap, dtype=f32, device=d)
        self.bufi = torch.empty(rows * c.band_cap, dtype=i32, device=d)
        self.rows, self.chunks = rows, chunks

    def paths(self, rows: int) -> torch.Tensor:
        """[rows] int32 of the last call: 0 greedy, 1 unfiltered race, 2 band, 3 slow path."""
        return self.wri.view(-1, 2)[:rows, 1]


def _check(logits: torch.Tensor, slots: torch.Tensor, t: L.SlotTables) -> None:
    dev = logits.device
    C.check_device("logits", logits, dev)
    C.check_dtype("logits", logits, C.FLOAT_DTYPES)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got {tuple(logits.shape)}")
    C.check_last_dim_contiguous("logits", logits)
    rows, vocab = logits.shape
    C.check_device("slots", slots, dev)
    C.check_dtype("slots", slots, (torch.int32, torch.int64))
    C.check_shape("slots", slots, (rows,))
    if not slots.is_contiguous():
        raise ValueError("slots must be contiguous")
    num_slots = t.fparams.shape[0]
    for name, x, dtype, width in (("fparams", t.fparams, torch.float32, L.NUM_F),
                                  ("iparams", t.iparams, torch.int32, L.NUM_I)):
        C.check_device(name, x, dev)
        C.check_dtype(name, x, (dtype,))
        C.check_shape(name, x, (num_slots, width))
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    C.check_device("stop_ids", t.stop_ids, dev)
    C.check_dtype("stop_ids", t.stop_ids, (torch.int32,))
    if t.stop_ids.dim() != 2 or t.stop_ids.shape[0] != num_slots or t.stop_ids.shape[1] < 1:
        raise ValueError(f"stop_ids must be [{num_slots}, >= 1], got {tuple(t.stop_ids.shape)}")
    C.check_device("occ", t.occ, dev)
    C.check_dtype("occ", t.occ, (torch.int32,))
    if t.occ.dim() != 2 or t.occ.shape[1] != vocab or not t.occ.is_contiguous():
        raise ValueError(f"occ must be a contiguous [P, {vocab}] tensor, got {tuple(t.occ.shape)}")
    if vocab >= 2**31 - 1:
        raise ValueError(f"vocab {vocab} does not fit int32 token ids")


def _run(logits, slots, t: L.SlotTables, ws: SamplingWorkspace, filters: bool, record: bool,
         out: torch.Tensor) -> tuple:
    cfg = ws.cfg
    rows, vocab = logits.shape
    chunks = triton.cdiv(vocab, cfg.chunk)
    ncp = triton.next_power_of_2(chunks)
    ws.ensure(rows, chunks)
    occ = t.occ if t.occ.numel() else torch.zeros(1, vocab, dtype=torch.int32, device=logits.device)
    src = (logits, logits.stride(0), occ, t.stop_ids, vocab)
    tab = (slots, t.fparams, t.iparams)
    br, ms = cfg.rows_per_program, t.stop_ids.shape[1]
    grid = (triton.cdiv(rows, br), chunks)
    opts = dict(num_warps=cfg.num_warps, enable_fp_fusion=False)
    K.stats_kernel[grid](src, *tab, ws.wsf, ws.wsi, rows, chunks, CHUNK=cfg.chunk, BR=br,
                         BC=cfg.block, MAX_STOP=ms, **opts)
    if filters:
        for rd in range(cfg.rounds):
            K.pivot_kernel[grid](src, *tab, ws.wsf, ws.wsi, ws.wsc, ws.wsm, rows, chunks, ROUND=rd,
                                 CHUNK=cfg.chunk, BR=br, BC=cfg.pivot_block, NCP=ncp, PP=cfg.pivots,
                                 MAX_STOP=ms, num_warps=2 * cfg.num_warps, enable_fp_fusion=False)
        K.gather_kernel[grid](src, *tab, ws.wsf, ws.wsi, ws.wsc, ws.wsm, ws.wgf, ws.wgi, ws.wrf,
                              ws.wri, ws.bufv, ws.bufi, rows, chunks, cfg.band_cap,
                              ROUNDS=cfg.rounds, CHUNK=cfg.chunk, BR=br, BC=cfg.block, NCP=ncp,
                              PP=cfg.pivots, MAX_STOP=ms, **opts)
    F.finalize_kernel[(triton.cdiv(rows, br),)](
        src, *tab, ws.wsf, ws.wsi, ws.wgf, ws.wgi, ws.wrf, ws.wri, ws.bufv, ws.bufi, out, rows,
        chunks, cfg.band_cap, RECORD=record, BR=br, BC=cfg.block, BB=cfg.band_block, NCP=ncp,
        NQ=cfg.search_width, MAX_STOP=ms, **opts)
    return src, tab, grid, chunks, ncp


def sample_slots(
    logits: torch.Tensor,  # [R, V] float32/bf16/fp16, last dim contiguous
    slots: torch.Tensor,  # [R] int32/int64: each row's slot, each slot at most once
    tables: L.SlotTables,
    ws: SamplingWorkspace,
    *,
    filters: bool = True,
    record: bool = True,
) -> torch.Tensor:
    """Token ids [R] int64, as reference_sampling.sample_slots draws them. With record, each slot's
    position advances and its penalty row counts the token, on the device. filters=False skips the
    pivot and gather passes: only when no row's slot has top-k, top-p or min-p."""
    _check(logits, slots, tables)
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    if logits.shape[0]:
        _run(logits, slots, tables, ws, filters, record, out)
    return out


def probs_slots(
    logits: torch.Tensor, slots: torch.Tensor, tables: L.SlotTables, ws: SamplingWorkspace, *,
    filters: bool = True,
) -> torch.Tensor:
    """[R, V] float32: the distribution sample_slots draws each row from; nothing is recorded."""
    _check(logits, slots, tables)
    rows, vocab = logits.shape
    probs = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return probs
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    src, tab, grid, chunks, ncp = _run(logits, slots, tables, ws, filters, False, tokens)
    cfg = ws.cfg
    F.probs_kernel[grid](src, *tab, ws.wsf, ws.wsi, ws.wrf, probs, probs.stride(0), rows, chunks,
                         CHUNK=cfg.chunk, BR=cfg.rows_per_program, BC=cfg.block, NCP=ncp,
                         MAX_STOP=tables.stop_ids.shape[1], num_warps=cfg.num_warps,
                         enable_fp_fusion=False)
    return probs
