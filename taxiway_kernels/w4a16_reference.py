"""W4A16 (4-bit weights, 16-bit activations): the kernel's weight layout and its plain-torch reference.

The layout taxiway_kernels/w4a16.py reads (checkpoint formats convert into it at load, gpu_engine/quant/int4.py):

    qweight: [N, K // 8] int32   row n holds the 4-bit codes of w[n, :]; bits 4j..4j+3 of word i
                                 hold the code of k = 8 i + j (little-endian nibbles along K)
    scales:  [N, K // g]         activation dtype (float16 / bfloat16 / float32)
    zeros:   [N, K // g] uint8   codes 0..15; None for symmetric weights (zero point 8)

    w[n, k] = (code[n, k] - zero[n, k // g]) * scale[n, k // g]      y = x @ w.T  (as F.linear)

Rows of N are contiguous runs of K / 2 bytes, so a program that owns a few output rows reads them
as long coalesced streams (the M = 1 GEMV), and a [BN, BK] tile is BN runs of BK / 2 bytes. It is
also compressed-tensors' `weight_packed` layout, which therefore loads without repacking.
No triton here: the CPU engine and the tests import this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_GROUP_SIZES = (32, 64, 128)
SYMMETRIC_ZERO = 8
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble j of a word sits at bit 4 j


@dataclass(frozen=True)
class W4A16Weight:
    """One linear's weight in the kernel layout (see the module docstring)."""

    qweight: torch.Tensor  # [N, K // 8] int32
    scales: torch.Tensor  # [N, K // g] float16 / bfloat16 / float32
    zeros: torch.Tensor | None  # [N, K // g] uint8, or None (symmetric: zero 8)
    group_size: int

    def __post_init__(self) -> None:
        check_w4a16_weight(self.qweight, self.scales, self.zeros, self.group_size)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 8

    def nbytes(self) -> int:
        """Bytes stored (and read by a GEMM): packed codes + scales + zero points."""
        tensors = [self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def check_w4a16_weight(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> None:
    """Raise ValueError naming the tensor and what was expected."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D int32 tensor [N, K // 8], got {qweight.dtype} {tuple(qweight.shape)}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size {group_size} is not supported; expected one of {SUPPORTED_GROUP_SIZES}")
    n, k = qweight.shape[0], qweight.shape[1] * 8
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {k}")
    groups = (n, k // group_size)
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"scales has dtype {scales.dtype}, expected float16, bfloat16 or float32")
    if tuple(scales.shape) != groups:
        raise ValueError(f"scales has shape {tuple(scales.shape)}, expected {groups} (N, K // group_size)")
    if zeros is not None:
        if zeros.dtype != torch.uint8:
            raise ValueError(f"zeros has dtype {zeros.dtype}, expected torch.uint8 codes 0..15")
        if tuple(zeros.shape) != groups:
            raise ValueError(f"zeros has shape {tuple(zeros.shape)}, expected {groups} (N, K // group_size)")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and t.device != qweight.device:
            raise ValueError(f"{name} is on {t.device}, expected qweight's device {qweight.device}")


def pack_int4_k(codes: torch.Tensor) -> torch.Tensor:
    """codes: [R, C] integer in 0..15, C % 8 == 0 -> [R, C // 8] int32, nibble j of word i = code 8 i + j."""
    if codes.dim() != 2 or codes.shape[1] % 8:
        raise ValueError(f"codes must be [R, C] with C a multiple of 8, got {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError(f"4-bit codes must lie in 0..15, got {int(c.min())}..{int(c.max())}")
    words = (c.view(c.shape[0], -1, 8) << _SHIFTS.to(c.device, torch.int64)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4_k(packed: torch.Tensor) -> torch.Tensor:
    """[R, C // 8] int32 -> [R, C] uint8 codes (inverse of pack_int4_k)."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    nib = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF  # [R, C // 8, 8]
    return nib.reshape(packed.shape[0], -1).to(torch.uint8)


def dequantize_w4a16(w: W4A16Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [N, K] in `dtype`, computed in float32: (code - zero) * scale."""
    codes = unpack_int4_k(w.qweight).float()  # [N, K]
    g = w.group_size
    zeros = w.zeros.float() if w.zeros is not None else torch.full_like(w.scales, SYMMETRIC_ZERO, dtype=torch.float32)
    deq = (codes.view(w.out_features, -1, g) - zeros.unsqueeze(-1)) * w.scales.float().unsqueeze(-1)
    return deq.view(w.out_features, -1).to(dtype)


def w4a16_linear(x: torch.Tensor, w: W4A16Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: x [M, K] @ dequant(w).T (+ bias) in float32, returned in x's dtype [M, N]."""
    y = x.float() @ dequantize_w4a16(w).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
