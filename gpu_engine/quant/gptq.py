"""GPTQ rounding (Frantar et al., "GPTQ", 2022: OBQ with lazy batch updates, as AutoGPTQ's
`fasterquant` and llm-compressor's GPTQModifier compute it), to group-wise INT4 and to FP8 with
per-channel scales.

Columns are rounded one at a time; each column's rounding error is spread over the columns not yet
rounded, weighted by the inverse Hessian of the layer's output error H = 2 X^T X / n (X: the
linear's calibration inputs), so that the rounded linear's outputs on X stay close to the float
ones. Updates go in blocks of columns (one rank-`block_size` update of the rest per block). The
results are what int4.quantize_int4 and fp8.quantize_weight_per_channel give (the same formulas for
scales, zeros and codes), so every export is unchanged. Pure torch, on whatever device the tensors
are on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gpu_engine.quant.int4 import Int4Weight, int4_codes, int4_group_params
from taxiway_kernels import reference as R
from taxiway_kernels.w4a16_reference import SYMMETRIC_ZERO

DAMP = 0.1
"""Default dampening, as a share of mean diag H. GPTQ's usual 0.01 fitted the calibration text's
domain: AWQ+GPTQ with it did better on held-out text of that domain and worse than AWQ alone on
other text (docs/awq.md); 0.1 did better on both."""

RoundColumn = Callable[[int, torch.Tensor, int], torch.Tensor]
"""(j, wb, i) -> the dequantized rounding [N] of column i of the current block wb [N, b], the j-th
column in rounding order."""


def hessian(x: torch.Tensor) -> torch.Tensor:  # x [..., K] -> [K, K] float32
    """2 X^T X / n over the n input rows of x."""
    x = x.reshape(-1, x.shape[-1]).float()
    return 2 * (x.t() @ x) / x.shape[0]


def gptq_int4(
    w: torch.Tensor,  # [N, K] the weight to round
    h: torch.Tensor,  # [K, K] hessian() of the inputs it sees
    group_size: int,
    zero_point: bool = True,
    *,
    static_groups: bool = True,
    act_order: bool = False,
    block_size: int = 128,
    percdamp: float = DAMP,
) -> Int4Weight:
    """GPTQ-round w to group-wise INT4.

    static_groups: each group's scale and zero come from w as given (llm-compressor's way; keeps
    the range that a clipping search chose); False: from the error-updated weights when the group
    is reached (AutoGPTQ's default). act_order: round the columns in order of decreasing diag h
    (the inputs with the most energy first, while the most columns are left to absorb their
    errors; llm-compressor's actorder "weight"); needs static_groups, so that groups stay
    contiguous and no g_idx is needed.
    block_size is rounded up to whole groups. Input channels that never fire (diag h == 0) get
    weight 0, as in GPTQ. percdamp: h += percdamp * mean(diag h) * I before it is inverted.
    With h = I no error propagates and the result is quantize_int4's.
    """
    n, k = w.shape
    g = group_size
    if g < 1 or k % g:
        raise ValueError(f"group_size {g} does not divide in_features {k}")
    if act_order and not static_groups:
        raise ValueError("act_order needs static_groups (dynamic groups in act order are not contiguous)")
    w, h = _zero_dead_inputs(w, h)
    scales = torch.empty(n, k // g, device=w.device)
    zeros = torch.empty(n, k // g, device=w.device) if zero_point else None
    if static_groups:
        _set_group_params(w.view(n, k // g, g), zero_point, scales, zeros, slice(None))
    perm = _order(h, act_order)
    groups = (perm // g).tolist()  # the group of each column in rounding order
    codes = torch.empty(n, k, device=w.device)

    def round_column(j: int, wb: torch.Tensor, i: int) -> torch.Tensor:
        gi = groups[j]
        if not static_groups and j % g == 0:
            _set_group_params(wb[:, i:i + g], zero_point, scales, zeros, gi)
        s, z = scales[:, gi], None if zeros is None else zeros[:, gi]
        codes[:, j] = int4_codes(wb[:, i], s, z)
        return (codes[:, j] - (SYMMETRIC_ZERO if z is None else z)) * s

    block_size = -(-block_size // g) * g  # whole groups, so a dynamic group's weights are in one block
    _gptq(w, h, perm, round_column, block_size, percdamp)
    codes = codes[:, torch.argsort(perm)]
    return Int4Weight(codes.to(torch.uint8), scales, None if zeros is None else zeros.to(torch.uint8), g)


def gptq_fp8(
    w: torch.Tensor,  # [N, K] the weight to round
    h: torch.Tensor,  # [K, K] hessian() of the inputs it sees
    *,
    act_order: bool = True,
    block_size: int = 128,
    percdamp: float = DAMP,
) -> tuple[torch.Tensor, torch.Tensor]:  # (fp8 [N, K] float8_e4m3fn, scale [N] f32)
    """GPTQ-round w to E4M3 with one scale per output channel, amax(row) / 448 of w as given (as
    fp8.quantize_weight_per_channel); act_order and the rest as in gptq_int4."""
    w, h = _zero_dead_inputs(w, h)
    scale = w.abs().amax(-1).clamp_min(1e-12) / R.FP8_MAX
    perm = _order(h, act_order)
    q = torch.empty(w.shape, dtype=R.FP8, device=w.device)

    def round_column(j: int, wb: torch.Tensor, i: int) -> torch.Tensor:
        q[:, j] = R.to_fp8(wb[:, i], scale)
        return q[:, j].float() * scale

    _gptq(w, h, perm, round_column, block_size, percdamp)
    return q[:, torch.argsort(perm)], scale


def _zero_dead_inputs(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 copies of w and h, with the input channels that never fire (diag h == 0) at weight 0
    and diag 1 (they carry no error, and h stays invertible)."""
    n, k = w.shape
    if tuple(h.shape) != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}], got {tuple(h.shape)}")
    w, h = w.float().clone(), h.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    return w, h


def _order(h: torch.Tensor, act_order: bool) -> torch.Tensor:  # [K] int64
    """The input channels in rounding order: by decreasing diag h (act order), or as they are."""
    if act_order:
        return torch.argsort(h.diagonal(), descending=True)
    return torch.arange(h.shape[0], device=h.device)


def _gptq(w: torch.Tensor, h: torch.Tensor, perm: torch.Tensor, round_column: RoundColumn,
          block_size: int, percdamp: float) -> None:
    """Round w [N, K]'s columns in the order perm, each through round_column, passing its error on."""
    n, k = w.shape
    w, hinv = w[:, perm], _inverse_hessian_factor(h[perm][:, perm], percdamp)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb, err, hb = w[:, b0:b1].clone(), torch.empty(n, b1 - b0, device=w.device), hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            q = round_column(b0 + i, wb, i)
            err[:, i] = (wb[:, i] - q) / hb[i, i]
            wb[:, i:] -= err[:, i:i + 1] * hb[i:i + 1, i:]
        w[:, b1:] -= err @ hinv[b0:b1, b1:]


def _set_group_params(w: torch.Tensor, zero_point: bool, scales: torch.Tensor, zeros: torch.Tensor | None,
                      at: int | slice) -> None:
    """scales[:, at] (and zeros[:, at]) = int4_group_params of the groups w [N, (G,) g]."""
    s, z = int4_group_params(w, zero_point)
    scales[:, at] = s.squeeze(-1)
    if zeros is not None:
        zeros[:, at] = z.squeeze(-1)


def _inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:  # [K, K] upper
    """The upper Cholesky factor of (h + percdamp * mean(diag h) * I)^-1: row i holds how column
    i's rounding error is spread over the columns after it (GPTQ's Cholesky reformulation)."""
    h = h.clone()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
