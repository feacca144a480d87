"""GPTQ rounding to group-wise INT4 (Frantar et al., "GPTQ", 2022: OBQ with lazy batch updates, as
AutoGPTQ's `fasterquant` and llm-compressor's GPTQModifier compute it).

Columns are rounded one at a time, left to right; each column's rounding error is spread over the
columns not yet rounded, weighted by the inverse Hessian of the layer's output error
H = 2 X^T X / n (X: the linear's calibration inputs), so that the rounded linear's outputs on X
stay close to the float ones. Updates go in blocks of columns (one rank-`block_size` update of the
rest per block). The result is the same Int4Weight that int4.quantize_int4 gives (the same formulas
for scales, zeros and codes), so every export is unchanged. Pure torch, on whatever device the
tensors are on.
"""

from __future__ import annotations

import torch

from gpu_engine.quant.int4 import Int4Weight, int4_codes, int4_group_params
from kernels.w4a16_reference import SYMMETRIC_ZERO


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
    percdamp: float = 0.01,
) -> Int4Weight:
    """GPTQ-round w to group-wise INT4.

    static_groups: each group's scale and zero come from w as given (llm-compressor's way; keeps
    the range that a clipping search chose); False: from the error-updated weights when the group
    is reached (AutoGPTQ's default). act_order: round the columns in order of decreasing diag h
    (the inputs with the most energy first, while the most columns are left to absorb their
    errors); needs static_groups, so that groups stay contiguous and no g_idx is needed.
    block_size is rounded up to whole groups. Input channels that never fire (diag h == 0) get
    weight 0, as in GPTQ. percdamp: h += percdamp * mean(diag h) * I before it is inverted.
    With h = I no error propagates and the result is quantize_int4's.
    """
    n, k = w.shape
    g = group_size
    if g < 1 or k % g:
        raise ValueError(f"group_size {g} does not divide in_features {k}")
    if tuple(h.shape) != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}], got {tuple(h.shape)}")
    if act_order and not static_groups:
        raise ValueError("act_order needs static_groups (dynamic groups in act order are not contiguous)")
    w, h = w.float().clone(), h.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scales = torch.empty(n, k // g, device=w.device)
    zeros = torch.empty(n, k // g, device=w.device) if zero_point else None
    if static_groups:
        _set_group_params(w.view(n, k // g, g), zero_point, scales, zeros, slice(None))
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    groups = (perm // g).tolist()  # the group of each column in rounding order
    hinv = _inverse_hessian_factor(h, percdamp)
    codes = torch.empty(n, k, device=w.device)
    block_size = -(-block_size // g) * g  # whole groups, so a dynamic group's weights are in one block
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb, err, hb = w[:, b0:b1].clone(), torch.empty(n, b1 - b0, device=w.device), hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            gi = groups[b0 + i]
            if not static_groups and (b0 + i) % g == 0:
                _set_group_params(wb[:, i:i + g], zero_point, scales, zeros, gi)
            s, z = scales[:, gi], None if zeros is None else zeros[:, gi]
            codes[:, b0 + i] = int4_codes(wb[:, i], s, z)
            q = (codes[:, b0 + i] - (SYMMETRIC_ZERO if z is None else z)) * s
            err[:, i] = (wb[:, i] - q) / hb[i, i]
            wb[:, i:] -= err[:, i:i + 1] * hb[i:i + 1, i:]
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    codes = codes[:, torch.argsort(perm)]
    return Int4Weight(codes.to(torch.uint8), scales, None if zeros is None else zeros.to(torch.uint8), g)


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
