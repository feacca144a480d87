"""FP8 (E4M3) W8A8 linears: weights in FP8 with one scale per output channel, activations in FP8
per token or with one static scale; GEMMs through taxiway_kernels.fp8_gemm.fp8_linear on a GPU
(torch._scaled_mm, or the small-M Triton kernel up to 64 tokens), the dequantizing reference
(taxiway_kernels.reference.fp8_linear) elsewhere.

Checkpoint schemes (gpu_engine/quant/detect.py): per-channel or per-tensor weight scales,
dynamic per-token or static per-tensor input scales, or online (16/32-bit weights quantized per
channel at load). Fused parts (q/k/v, gate/up) that carry different per-tensor weight scales keep
them exactly, each broadcast over its own rows of the per-channel scale vector; their static input
scales (one input, several scales) are merged into the largest, which clips none of them.
"""

from __future__ import annotations

import torch
from torch import nn

from gpu_engine.errors import ModelLoadError
from gpu_engine.quant.activation import ActQuant, QuantizedActivation
from gpu_engine.quant.linear import LinearMethod, QuantLinear
from gpu_engine.quant.spec import QuantSpec
from taxiway_kernels import reference as R
from taxiway_kernels.fp8_gemm import fp8_linear

FP8 = torch.float8_e4m3fn


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [rows, K] float -> (fp8 [rows, K], scale [rows] f32) with scale = amax(row) / 448."""
    q, scale = R.quantize_fp8(w)
    return q, scale.view(-1)


class Fp8Linear(QuantLinear):
    """weight [N, K] float8_e4m3fn, weight_scale [N] f32, input_scale [1] f32 (static only), bias [N]."""

    def __init__(self, in_features: int, parts: list[int], bias: bool, dtype: torch.dtype,
                 spec: QuantSpec, hf_names: list[str]):
        super().__init__(in_features, parts)
        if spec.activations is None:
            raise ModelLoadError(f"FP8 weight-only (W8A16) checkpoints are not supported ({hf_names[0]}): "
                                 f"expected dynamic per-token or static per-tensor FP8 input activations")
        self.spec = spec
        self.dtype = dtype
        self.static = not spec.activations.dynamic
        n = self.out_features
        self.weight = nn.Parameter(torch.empty(n, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(n, dtype=torch.float32), requires_grad=False)
        self.input_scale = (nn.Parameter(torch.empty(1, dtype=torch.float32), requires_grad=False)
                            if self.static else None)
        self.bias = nn.Parameter(torch.empty(n, dtype=dtype), requires_grad=False) if bias else None
        self._part_input_scales: list[float | None] = [None] * len(parts)

    @property
    def input_quant(self) -> ActQuant:
        return ActQuant(self.input_scale)

    def expected(self) -> dict[str, str]:
        k = self.in_features
        if not self.spec.serialized:
            d = {"weight": f"[rows, {k}] 16/32-bit floats (quantized per channel at load)"}
        else:
            per = "[] or [1] (per tensor)" if self.spec.weights.strategy == "tensor" else "[rows, 1] (per channel)"
            d = {"weight": f"float8_e4m3fn [rows, {k}]", "weight_scale": f"float {per}"}
            if self.static:
                d["input_scale"] = "float [] or [1] (static per-tensor input scale)"
        if self.bias is not None:
            d["bias"] = "[rows] floating point"
        return d

    def load(self, part: int, kind: str, tensor: torch.Tensor, name: str) -> None:
        off, rows = self.rows(part, name)
        if kind not in self.expected():
            raise ModelLoadError(f"tensor {name!r} is not expected by {self.spec.describe()} "
                                 f"(this linear takes {', '.join(self.expected())})")
        dev = self.weight.device
        if kind == "bias":
            self.check_shape(name, tensor, (rows,))
            self.bias.data[off : off + rows].copy_(tensor.to(self.dtype))
        elif kind == "weight" and not self.spec.serialized:
            self.check_shape(name, tensor, (rows, self.in_features))
            if not tensor.dtype.is_floating_point or tensor.dtype.itemsize == 1:
                raise ModelLoadError(f"tensor {name!r} has dtype {tensor.dtype}; online FP8 quantizes "
                                     f"16/32-bit checkpoints")
            q, scale = quantize_weight_per_channel(tensor.to(dev))
            self.weight.data[off : off + rows].copy_(q)
            self.weight_scale.data[off : off + rows].copy_(scale)
        elif kind == "weight":
            self.check_shape(name, tensor, (rows, self.in_features))
            if tensor.dtype != FP8:
                raise ModelLoadError(f"tensor {name!r} has dtype {tensor.dtype}, expected float8_e4m3fn "
                                     f"({self.spec.describe()})")
            self.weight.data[off : off + rows].copy_(tensor.to(dev))
        elif kind == "weight_scale":
            self.weight_scale.data[off : off + rows].copy_(self._weight_scale(tensor, rows, name).to(dev))
        else:  # input_scale
            if tensor.numel() != 1:
                raise ModelLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected one "
                                     f"value (a static per-tensor input scale)")
            self._part_input_scales[part] = float(tensor.float().reshape(()))

    def _weight_scale(self, tensor: torch.Tensor, rows: int, name: str) -> torch.Tensor:
        per_tensor = self.spec.weights.strategy == "tensor"
        if per_tensor and tensor.numel() == 1:
            return tensor.float().reshape(1).expand(rows)
        if not per_tensor and tensor.numel() == rows and tensor.dim() in (1, 2):
            return tensor.float().reshape(rows)
        want = "[] or [1]" if per_tensor else f"[{rows}, 1]"
        raise ModelLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {want} for "
                             f"{self.spec.weights.strategy} weight scales ({self.spec.describe()})")

    def process_after_loading(self) -> None:
        if self.static:
            scales = self._part_input_scales
            if any(s is None for s in scales):
                raise ModelLoadError("a static FP8 linear was left without input scales")
            if min(scales) <= 0:
                raise ModelLoadError(f"static input scales must be positive, got {scales}")
            self.input_scale.data.fill_(max(scales))
        if not bool(torch.isfinite(self.weight_scale).all()) or not bool((self.weight_scale > 0).all()):
            raise ModelLoadError("FP8 weight scales must be positive and finite")

    def init_dummy(self, gen: torch.Generator) -> None:
        chunk = max(1, (64 << 20) // (self.in_features * 2))  # 64 MiB of bf16 rows at a time
        for r0 in range(0, self.out_features, chunk):
            r1 = min(self.out_features, r0 + chunk)
            w = torch.empty(r1 - r0, self.in_features, dtype=torch.bfloat16, device=self.weight.device)
            q, scale = quantize_weight_per_channel(w.normal_(0.0, 0.02, generator=gen))
            self.weight.data[r0:r1].copy_(q)
            self.weight_scale.data[r0:r1].copy_(scale)
        if self.bias is not None:
            self.bias.data.zero_()
        if self.static:
            self.input_scale.data.fill_(1.0)

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        """x: [T, in] (quantized here, reference op) or an FP8 activation; returns [T, out] in the model's dtype."""
        if not isinstance(x, QuantizedActivation):
            x = QuantizedActivation(*R.quantize_fp8(x, self.input_scale))
        if x.data.is_cuda:
            return fp8_linear(x.data, x.scale, self.weight, self.weight_scale, self.bias, self.dtype)
        return R.fp8_linear(x.data, x.scale, self.weight, self.weight_scale, self.bias, self.dtype)


class Fp8Method(LinearMethod):
    """FP8 W8A8 for every linear but those the spec ignores (the LM head by default)."""

    min_capability, needs = (8, 9), "FP8 W8A8 needs an sm_89+ GPU (Ada, Hopper or newer)"

    def create_quantized(self, in_features: int, parts: list[int], bias: bool,
                         hf_names: list[str]) -> QuantLinear:
        return Fp8Linear(in_features, parts, bias, self.dtype, self.spec, hf_names)

