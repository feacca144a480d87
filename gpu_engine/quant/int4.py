"""Group-wise INT4 weights: one canonical form, and the checkpoint layouts that convert to and from it.

Canonical (`Int4Weight`), for a linear with N outputs and K inputs and group size g:

    codes  [N, K] uint8 in 0..15          w[n, k] = (codes[n, k] - zeros[n, k // g]) * scales[n, k // g]
    scales [N, K // g] float
    zeros  [N, K // g] uint8 in 0..15, or None for symmetric weights (zero point 8)

Layouts (pure torch; all checked against the code of the tools that write them):

- AutoAWQ GEMM (`quant_method: awq`, `version: gemm`): `qweight` [K, N // 8] int32 and `qzeros`
  [K // g, N // 8] int32, each word packing 8 consecutive output columns in AWQ's interleaved nibble
  order (nibble i holds column AWQ_ORDER[i]); `scales` [K // g, N] float16. Asymmetric (zero_point:
  true) is what AutoAWQ writes; for zero_point: false we write codes offset by 8 and qzeros of 8, so
  that loaders which always read qzeros (vLLM's awq) compute the same weights.
- compressed-tensors `pack-quantized` (llm-compressor's W4A16 / AWQ / GPTQ): `weight_packed` [N, K // 8]
  int32 of signed values + 8 packed along K little-endian, `weight_scale` [N, K // g],
  `weight_zero_point` [N // 8, K // g] int32 (asymmetric only: signed zero points + 8 packed along N),
  `weight_shape` [2] = (N, K).
- the W4A16 kernel's layout (taxiway_kernels/w4a16_reference.py): `weight_packed`'s packing, uint8 zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taxiway_kernels.w4a16_reference import (
    SUPPORTED_GROUP_SIZES,
    SYMMETRIC_ZERO,
    W4A16Weight,
    pack_int4_k,
    unpack_int4_k,
)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AutoAWQ word holds column AWQ_ORDER[i]


class Int4FormatError(ValueError):
    """A tensor of an INT4 checkpoint does not have the layout its format or config.json promise."""


@dataclass(frozen=True)
class Int4Weight:
    """One linear's weight as group-wise 4-bit codes (see the module docstring)."""

    codes: torch.Tensor  # [N, K] uint8 in 0..15
    scales: torch.Tensor  # [N, K // g] float
    zeros: torch.Tensor | None  # [N, K // g] uint8 in 0..15; None: symmetric (zero 8)
    group_size: int

    def __post_init__(self) -> None:
        if self.codes.dim() != 2 or self.codes.dtype != torch.uint8:
            raise Int4FormatError(f"codes must be [N, K] uint8, got {self.codes.dtype} {tuple(self.codes.shape)}")
        n, k = self.codes.shape
        g = self.group_size
        if g < 1 or k % g:
            raise Int4FormatError(f"group_size {g} does not divide in_features {k}")
        if tuple(self.scales.shape) != (n, k // g) or not self.scales.is_floating_point():
            raise Int4FormatError(
                f"scales must be float [{n}, {k // g}], got {self.scales.dtype} {tuple(self.scales.shape)}"
            )
        if self.zeros is not None and (tuple(self.zeros.shape) != (n, k // g) or self.zeros.dtype != torch.uint8):
            raise Int4FormatError(
                f"zeros must be uint8 [{n}, {k // g}], got {self.zeros.dtype} {tuple(self.zeros.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def zero_points(self) -> torch.Tensor:
        """[N, K // g] uint8, 8 everywhere for symmetric weights."""
        if self.zeros is not None:
            return self.zeros
        return torch.full(self.scales.shape, SYMMETRIC_ZERO, dtype=torch.uint8, device=self.codes.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] dense weight, computed in float32."""
        n, k = self.shape
        g = self.group_size
        q = self.codes.float().view(n, k // g, g) - self.zero_points().float().unsqueeze(-1)
        return (q * self.scales.float().unsqueeze(-1)).view(n, k).to(dtype)


def int4_group_params(w: torch.Tensor, zero_point: bool):
    """(scales, zeros) of the groups w [..., g] as float [..., 1] and [..., 1] | None (symmetric)."""
    if zero_point:
        wmax, wmin = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
        scales = (wmax - wmin).clamp(min=1e-5) / 15
        return scales, (-torch.round(wmin / scales)).clamp(0, 15)
    return w.abs().amax(-1, keepdim=True).clamp(min=1e-5) / 7, None


def int4_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """Codes 0..15 (as float) of w rounded to the grid of (scales, zeros) that broadcast against it."""
    if zeros is not None:
        return (torch.round(w / scales) + zeros).clamp(0, 15)
    return torch.round(w / scales).clamp(-8, 7) + SYMMETRIC_ZERO


def _round_int4(w: torch.Tensor, group_size: int, zero_point: bool):
    """(codes, scales, zeros) of w [N, K] as float [N, K/g, g], [N, K/g, 1], [N, K/g, 1] | None."""
    n, k = w.shape
    if k % group_size:
        raise Int4FormatError(f"group_size {group_size} does not divide in_features {k}")
    wg = w.float().reshape(n, k // group_size, group_size)
    scales, zeros = int4_group_params(wg, zero_point)
    return int4_codes(wg, scales, zeros), scales, zeros


def quantize_int4(w: torch.Tensor, group_size: int, zero_point: bool = True) -> Int4Weight:
    """Round-to-nearest group-wise INT4 of w [N, K] (AutoAWQ's formulas).

    zero_point: scale = (max - min) / 15, zero = round(-min / scale) in 0..15;
    symmetric: scale = max|w| / 7, codes = clamp(round(w / scale), -8, 7) + 8.
    """
    codes, scales, zeros = _round_int4(w, group_size, zero_point)
    z = None if zeros is None else zeros.squeeze(-1).to(torch.uint8)
    return Int4Weight(codes.reshape(w.shape).to(torch.uint8), scales.squeeze(-1), z, group_size)


def fake_quantize_int4(w: torch.Tensor, group_size: int, zero_point: bool = True) -> torch.Tensor:
    """quantize_int4 then dequantize, in w's dtype and shape (without building the codes)."""
    codes, scales, zeros = _round_int4(w, group_size, zero_point)
    zeros = torch.full_like(scales, SYMMETRIC_ZERO) if zeros is None else zeros
    return ((codes - zeros) * scales).reshape(w.shape).to(w.dtype)


# ---------------------------------------------------------------- the kernel's layout


def kernel_group_size(group_size: int) -> int:
    """The group size the W4A16 kernel runs a checkpoint's `group_size` with: itself when the
    kernel has it, 128 for a multiple of 128 (256, or per-channel: the same weights in groups of 128)."""
    if group_size in SUPPORTED_GROUP_SIZES:
        return group_size
    if group_size < 1 or group_size % 128:
        raise Int4FormatError(
            f"group_size {group_size} is not supported by the W4A16 kernel: expected one of "
            f"{SUPPORTED_GROUP_SIZES} or a multiple of 128"
        )
    return 128


def to_kernel_layout(wt: Int4Weight, dtype: torch.dtype) -> W4A16Weight:
    """The W4A16 kernel's layout, scales in the activation dtype (groups split as kernel_group_size says)."""
    g = kernel_group_size(wt.group_size)
    scales, zeros = wt.scales, wt.zeros
    if g != wt.group_size:
        rep = wt.group_size // g
        scales = scales.repeat_interleave(rep, dim=1)
        zeros = zeros.repeat_interleave(rep, dim=1) if zeros is not None else None
    return W4A16Weight(
        qweight=pack_int4_k(wt.codes),
        scales=scales.to(dtype).contiguous(),
        zeros=zeros.contiguous() if zeros is not None else None,
        group_size=g,
    )


def from_kernel_layout(w: W4A16Weight) -> Int4Weight:
    return Int4Weight(unpack_int4_k(w.qweight), w.scales, w.zeros, w.group_size)


# ---------------------------------------------------------------- AutoAWQ GEMM


def _awq_shifts(device: torch.device) -> torch.Tensor:
    """Bit offset of output column c (0..7 within a word) in an AutoAWQ word."""
    shifts = torch.empty(8, dtype=torch.int32)
    for nibble, col in enumerate(AWQ_ORDER):
        shifts[col] = 4 * nibble
    return shifts.to(device)


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """[R, C // 8] int32 AutoAWQ words -> [R, C] uint8 codes in natural column order."""
    nib = (packed.unsqueeze(-1) >> _awq_shifts(packed.device)) & 0xF
    return nib.reshape(packed.shape[0], -1).to(torch.uint8)


def _awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """[R, C] codes 0..15 -> [R, C // 8] int32 AutoAWQ words (inverse of _awq_unpack)."""
    c = codes.to(torch.int64).view(codes.shape[0], -1, 8)
    words = (c << _awq_shifts(codes.device).to(torch.int64)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _check(name: str, t: torch.Tensor | None, dtype: torch.dtype | None, shape: tuple[int, ...]) -> torch.Tensor:
    if t is None:
        raise Int4FormatError(f"{name} is missing: expected a tensor of shape {shape}")
    if dtype is not None and t.dtype != dtype:
        raise Int4FormatError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise Int4FormatError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} from config.json")
    return t


def from_autoawq(
    qweight: torch.Tensor | None,  # [K, N // 8] int32
    qzeros: torch.Tensor | None,  # [K // g, N // 8] int32
    scales: torch.Tensor | None,  # [K // g, N] float16
    *,
    in_features: int,
    out_features: int,
    group_size: int,
    zero_point: bool,
    name: str = "linear",
) -> Int4Weight:
    """An AutoAWQ GEMM-layout linear in canonical form; errors name `name`.<tensor>."""
    k, n = in_features, out_features
    g = k if group_size == -1 else group_size
    if g < 1 or k % g or n % 8:
        raise Int4FormatError(f"{name}: group_size {group_size} must divide in_features {k} and 8 out_features {n}")
    qw = _check(f"{name}.qweight", qweight, torch.int32, (k, n // 8))
    sc = _check(f"{name}.scales", scales, None, (k // g, n))
    if not sc.is_floating_point():
        raise Int4FormatError(f"{name}.scales has dtype {sc.dtype}, expected a float dtype")
    codes = _awq_unpack(qw).t().contiguous()  # [N, K]
    zeros = None
    if zero_point:
        zeros = _awq_unpack(_check(f"{name}.qzeros", qzeros, torch.int32, (k // g, n // 8))).t().contiguous()
    elif qzeros is not None:
        z = _awq_unpack(_check(f"{name}.qzeros", qzeros, torch.int32, (k // g, n // 8)))
        if not bool((z == SYMMETRIC_ZERO).all()):
            raise Int4FormatError(
                f"{name}.qzeros holds zero points other than 8 but config.json says zero_point: false"
            )
    return Int4Weight(codes, sc.t().contiguous(), zeros, g)


def to_autoawq(wt: Int4Weight) -> dict[str, torch.Tensor]:
    """{qweight, qzeros, scales} in AutoAWQ's GEMM layout (qzeros of 8 for symmetric weights)."""
    return {
        "qweight": _awq_pack(wt.codes.t().contiguous()),
        "qzeros": _awq_pack(wt.zero_points().t().contiguous()),
        "scales": wt.scales.t().to(torch.float16).contiguous(),
    }


# ---------------------------------------------------------------- compressed-tensors pack-quantized


def from_compressed_tensors(
    weight_packed: torch.Tensor | None,  # [N, K // 8] int32
    weight_scale: torch.Tensor | None,  # [N, K // g]
    weight_zero_point: torch.Tensor | None,  # [N // 8, K // g] int32 (asymmetric)
    weight_shape: torch.Tensor | None,  # [2] int
    *,
    in_features: int,
    out_features: int,
    group_size: int | None,
    symmetric: bool,
    name: str = "linear",
) -> Int4Weight:
    """A compressed-tensors pack-quantized INT4 linear in canonical form (group or channel strategy:
    group_size None means one group per row)."""
    k, n = in_features, out_features
    g = k if group_size is None else group_size
    if g < 1 or k % g or k % 8:
        raise Int4FormatError(f"{name}: group_size {group_size} must divide in_features {k} (a multiple of 8)")
    if weight_shape is not None and [int(v) for v in weight_shape.reshape(-1)] != [n, k]:
        raise Int4FormatError(
            f"{name}.weight_shape is {[int(v) for v in weight_shape.reshape(-1)]}, expected {[n, k]} from config.json"
        )
    codes = unpack_int4_k(_check(f"{name}.weight_packed", weight_packed, torch.int32, (n, k // 8)))
    sc = _check(f"{name}.weight_scale", weight_scale, None, (n, k // g))
    if not sc.is_floating_point():
        raise Int4FormatError(f"{name}.weight_scale has dtype {sc.dtype}, expected a float dtype")
    zeros = None
    if not symmetric:
        if n % 8:
            raise Int4FormatError(f"{name}: out_features {n} must be a multiple of 8 for packed zero points")
        zp = _check(f"{name}.weight_zero_point", weight_zero_point, torch.int32, (n // 8, k // g))
        zeros = unpack_int4_k(zp.t().contiguous()).t().contiguous()  # packed along N
    elif weight_zero_point is not None and bool(weight_zero_point.ne(0).any()):
        raise Int4FormatError(f"{name}.weight_zero_point is non-zero but the scheme is symmetric")
    return Int4Weight(codes, sc.contiguous(), zeros, g)


def to_compressed_tensors(wt: Int4Weight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{weight_packed, weight_scale, weight_shape[, weight_zero_point]} as compressed-tensors writes them."""
    out = {
        "weight_packed": pack_int4_k(wt.codes),
        "weight_scale": wt.scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor(wt.shape, dtype=torch.int64),
    }
    if wt.zeros is not None:
        out["weight_zero_point"] = pack_int4_k(wt.zeros.t().contiguous()).t().contiguous()
    return out
