"""The INT4 AWQ (W4A16) linear method: every linear but those the checkpoint leaves unquantized
becomes an Int4Linear, filled from the checkpoint as published.

Formats (gpu_engine/quant/int4.py says how each packs): AutoAWQ GEMM (`qweight`, `qzeros`,
`scales` per linear) and compressed-tensors pack-quantized W4A16 (`weight_packed`, `weight_scale`,
`weight_zero_point` when asymmetric, `weight_shape`). A fused linear (q|k|v, gate|up) takes each
part's tensors as they arrive and converts that part, on the layer's device, once it has them
all: the parts stack along the output rows, each with its own groups and zero points, so the
fused layer computes exactly what the separate ones would. Dummy weights (benchmarks) are random
codes made on the device in the kernel's layout.
"""

from __future__ import annotations

import torch

from gpu_engine.errors import ModelLoadError
from gpu_engine.quant.int4 import Int4FormatError, kernel_group_size
from gpu_engine.quant.int4_checkpoint import Int4Scheme, read_linear
from gpu_engine.quant.int4_linear import Int4Linear
from gpu_engine.quant.linear import LinearMethod, QuantLinear
from gpu_engine.quant.spec import QuantSpec, WeightScheme
from taxiway_kernels.w4a16_reference import SUPPORTED_GROUP_SIZES

DUMMY_GROUP_SIZE = 128
"""Dummy AWQ weights use groups of 128 (what published AWQ checkpoints use), or the largest
supported size that divides a smaller model's input."""


class AwqLinear(Int4Linear):
    """An Int4Linear loaded from an AutoAWQ or compressed-tensors INT4 checkpoint."""

    def __init__(self, in_features: int, parts: list[int], bias: bool, dtype: torch.dtype,
                 spec: QuantSpec, scheme: Int4Scheme, hf_names: list[str]):
        g = in_features if scheme.group_size in (None, -1) else scheme.group_size  # per channel: one group per row
        if g < 1 or in_features % g:
            raise ModelLoadError(f"{hf_names[0]}: the checkpoint's group_size {g} does not divide the "
                                 f"linear's in_features {in_features} ({spec.describe()})")
        try:
            kernel_group = kernel_group_size(g)
        except Int4FormatError as exc:
            raise ModelLoadError(f"{hf_names[0]}: {exc}") from exc
        super().__init__(in_features, parts, bias, group_size=kernel_group, symmetric=scheme.symmetric, dtype=dtype)
        self.spec, self.scheme, self.checkpoint_group = spec, scheme, g
        self._pending: list[dict[str, torch.Tensor]] = [{} for _ in parts]
        self._loaded = [False] * len(parts)

    def required(self) -> dict[str, str]:
        """The INT4 tensors each part needs, kind -> what it must be."""
        k, g = self.in_features, self.checkpoint_group
        if self.scheme.fmt == "autoawq":
            return {"qweight": f"int32 [{k}, rows / 8] (AutoAWQ GEMM layout)",
                    "qzeros": f"int32 [{k // g}, rows / 8]", "scales": f"float16 [{k // g}, rows]"}
        d = {"weight_packed": f"int32 [rows, {k // 8}] (pack-quantized)", "weight_scale": f"float [rows, {k // g}]",
             "weight_shape": f"int [2] = (rows, {k})"}
        if not self.scheme.symmetric:
            d["weight_zero_point"] = f"int32 [rows / 8, {k // g}] (asymmetric)"
        return d

    def expected(self) -> dict[str, str]:
        d = self.required()
        if self.bias is not None:
            d["bias"] = "[rows] floating point"
        return d

    def load(self, part: int, kind: str, tensor: torch.Tensor, name: str) -> None:
        off, rows = self.rows(part, name)
        if kind == "bias" and self.bias is not None:
            self.check_shape(name, tensor, (rows,))
            self.bias.data[off : off + rows].copy_(tensor.to(self.bias.dtype))
            return
        if kind == "weight_zero_point" and self.scheme.fmt == "compressed-tensors" and self.scheme.symmetric:
            if bool(tensor.ne(0).any()):  # older compressed-tensors write zeros for symmetric weights
                raise ModelLoadError(f"tensor {name!r} holds non-zero zero points, but the checkpoint "
                                     f"is symmetric ({self.spec.describe()})")
            return
        required = self.required()
        if kind not in required:
            raise ModelLoadError(self._unexpected(kind, name))
        self._pending[part][kind] = tensor
        if len(self._pending[part]) == len(required):
            self._convert(part, rows, name.rpartition(".")[0])

    def _convert(self, part: int, rows: int, prefix: str) -> None:
        dev = self.qweight.device
        tensors = {kind: t.to(dev) for kind, t in self._pending[part].items()}
        self._pending[part] = {}
        try:
            self.load_part(part, read_linear(self.scheme, tensors, self.in_features, rows, prefix), prefix)
        except Int4FormatError as exc:
            raise ModelLoadError(f"{exc} ({self.spec.describe()})") from exc
        self._loaded[part] = True

    def _unexpected(self, kind: str, name: str) -> str:
        why = {"g_idx": "act-order (g_idx) INT4 checkpoints are not supported",
               "weight_g_idx": "act-order (g_idx) INT4 checkpoints are not supported",
               "weight": "a 16-bit weight in an INT4 checkpoint: leave the module out of the quantized "
                         "ones in its config (ignore / modules_to_not_convert), or quantize it"}
        return (f"tensor {name!r} is not expected by {self.spec.describe()}: "
                f"{why.get(kind, 'this linear takes ' + ', '.join(self.expected()))}")

    def process_after_loading(self) -> None:
        if not all(self._loaded):
            missing = [kind for p in self._pending for kind in self.required() if kind not in p]
            raise ModelLoadError(f"an INT4 linear was left without its {sorted(set(missing))} tensors")
        if not bool(torch.isfinite(self.scales).all()):
            raise ModelLoadError(f"INT4 scales must be finite ({self.spec.describe()})")


def dummy_group_size(in_features: int) -> int:
    for g in (DUMMY_GROUP_SIZE,) + tuple(sorted(SUPPORTED_GROUP_SIZES, reverse=True)):
        if in_features % g == 0:
            return g
    raise ModelLoadError(f"dummy INT4 weights need in_features divisible by one of {SUPPORTED_GROUP_SIZES}, "
                         f"got {in_features}")


class AwqMethod(LinearMethod):
    """INT4 weights, 16-bit activations: the W4A16 kernels on a GPU, dequantize + matmul elsewhere."""

    min_capability, needs = (8, 0), "the W4A16 kernels need an sm_80+ GPU (Ampere or newer)"

    def __init__(self, spec: QuantSpec, dtype: torch.dtype):
        super().__init__(spec, dtype)
        if spec.source == "dummy":
            self.scheme = None
            return
        try:
            self.scheme = Int4Scheme.from_spec(spec)
        except Int4FormatError as exc:
            raise ModelLoadError(str(exc)) from exc

    @classmethod
    def dummy_spec(cls) -> QuantSpec:
        """quantization="awq" with load_format="dummy": asymmetric INT4 in groups of 128."""
        return QuantSpec(method="awq", source="dummy", activations=None, serialized=False,
                         weights=WeightScheme(4, "int", "group", group_size=DUMMY_GROUP_SIZE, symmetric=False),
                         checkpoint_format="dummy")

    def create_quantized(self, in_features: int, parts: list[int], bias: bool,
                         hf_names: list[str]) -> QuantLinear:
        if self.scheme is None:
            return Int4Linear(in_features, parts, bias, group_size=dummy_group_size(in_features),
                              symmetric=self.spec.weights.symmetric, dtype=self.dtype)
        return AwqLinear(in_features, parts, bias, self.dtype, self.spec, self.scheme, hf_names)

