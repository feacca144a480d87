"""The activations that cross from a fused norm / SiLU / quantize op into a quantized linear."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ActQuant:
    """How a linear wants its input quantized: FP8 per token (static_scale None) or with one
    static per-tensor scale. The op producing the input (RMSNorm, SiLU-and-mul) quantizes it."""

    static_scale: torch.Tensor | None  # [1] f32 on the model's device


@dataclass(frozen=True)
class QuantizedActivation:
    """An FP8 activation with one scale per row (a static scale is written into every row)."""

    data: torch.Tensor  # [T, K] float8_e4m3fn
    scale: torch.Tensor  # [T, 1] f32

    @property
    def shape(self) -> torch.Size:
        return self.data.shape
