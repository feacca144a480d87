"""A linear layer holding group-wise INT4 weights in the W4A16 kernel's layout, for the AWQ linear
method to hand the model (gpu_engine/quant/awq_method.py adds the checkpoint formats): fused parts
(q|k|v, gate|up) stack their rows. On CUDA it runs taxiway_kernels/w4a16.py; elsewhere the reference
(dequantize, then F.linear), with the dense weight dequantized once and kept beside the INT4
buffers (not counted as stored bytes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpu_engine.quant.int4 import Int4FormatError, Int4Weight, to_kernel_layout
from gpu_engine.quant.linear import QuantLinear
from taxiway_kernels.w4a16_reference import (
    SUPPORTED_GROUP_SIZES,
    W4A16Weight,
    dequantize_w4a16,
)


class Int4Linear(QuantLinear):
    """y = x @ dequant(W).T + b with W [sum(parts), in_features] INT4 (buffers qweight, scales,
    zeros; their bytes are what the layer stores and a GEMM reads)."""

    def __init__(self, in_features: int, parts: list[int], bias: bool, *, group_size: int,
                 symmetric: bool, dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__(in_features, parts)
        if group_size not in SUPPORTED_GROUP_SIZES or in_features % group_size:
            raise Int4FormatError(f"group_size {group_size} must be one of {SUPPORTED_GROUP_SIZES} "
                                  f"and divide in_features {in_features}")
        n = self.out_features
        self.group_size = group_size
        groups = (n, in_features // group_size)
        self.register_buffer("qweight", torch.zeros(n, in_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, dtype=dtype, device=device))
        self.register_buffer("zeros", None if symmetric else torch.zeros(groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(n, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._dense: torch.Tensor | None = None
        self._weight4: W4A16Weight | None = None

    def weight4(self) -> W4A16Weight:
        """The buffers as the kernel's weight (made once: its checks stay off the per-call path)."""
        w = self._weight4
        if w is None or w.qweight is not self.qweight or w.scales is not self.scales or w.zeros is not self.zeros:
            w = self._weight4 = W4A16Weight(self.qweight, self.scales, self.zeros, self.group_size)
        return w

    def load_part(self, index: int, wt: Int4Weight, name: str = "linear") -> None:
        """Copy part `index` (rows of parts[index]) from a canonical INT4 weight."""
        off, rows = self.rows(index, name)
        if wt.shape != (rows, self.in_features):
            raise Int4FormatError(f"{name} has shape {wt.shape}, expected {(rows, self.in_features)}")
        if wt.symmetric != (self.zeros is None):
            raise Int4FormatError(f"{name} is {'symmetric' if wt.symmetric else 'asymmetric'}, "
                                  f"but this layer was made {'symmetric' if self.zeros is None else 'asymmetric'}")
        k = to_kernel_layout(wt, self.scales.dtype)
        if k.group_size != self.group_size:
            raise Int4FormatError(f"{name} has group size {k.group_size}, expected {self.group_size}")
        self.qweight[off:off + rows].copy_(k.qweight)
        self.scales[off:off + rows].copy_(k.scales)
        if self.zeros is not None:
            self.zeros[off:off + rows].copy_(k.zeros)
        self._dense = None

    def init_dummy(self, gen: torch.Generator) -> None:
        """Random codes, zero points and scales made where the buffers live (benchmarks)."""
        dev = self.qweight.device
        self.qweight.copy_(torch.randint(-2**31, 2**31 - 1, self.qweight.shape, generator=gen, device=dev,
                                         dtype=torch.int64).to(torch.int32))
        # scales for about N(0, 0.02) weights: a step of 0.04 / 15 spans +-2 sigma
        self.scales.copy_(torch.full(self.scales.shape, 0.04 / 15, device=dev))
        if self.zeros is not None:
            self.zeros.copy_(torch.randint(7, 9, self.zeros.shape, generator=gen, device=dev).to(torch.uint8))
        if self.bias is not None:
            self.bias.zero_()
        self._dense = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in_features] -> [..., sum(parts)]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x.is_cuda:
            from taxiway_kernels.w4a16 import w4a16_linear

            y = w4a16_linear(x2.contiguous(), self.weight4(), self.bias)
        else:
            if self._dense is None or self._dense.dtype != x.dtype:
                self._dense = dequantize_w4a16(self.weight4(), x.dtype)
            y = F.linear(x2, self._dense, self.bias)
        return y.reshape(*lead, -1)
