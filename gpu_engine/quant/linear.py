"""The linear-method interface: how a model's linears are made, filled from a checkpoint and run.

The model asks its LinearMethod for each linear (`create_linear`), giving the output rows of each
fused part (q/k/v, gate/up) and the HF names of those parts. A checkpoint tensor named
`<hf part name>.<kind>` (weight, bias, weight_scale, input_scale, qweight, scales ...) goes to
`module.load(part, kind, tensor, name)`; once every tensor is in, `process_after_loading()`.
Under tensor parallelism the model sets each linear's `tp_shard` and gives it its rank's sizes; the
loader reads only that rank's slice of each tensor (`shard_axes` says which axes are its outputs
and inputs), so `load` sees tensors of the local shape.
Every stored tensor is a parameter of its module, so summing a module's parameters gives the
bytes it stores (the roofline counts them so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpu_engine.errors import ModelLoadError
from gpu_engine.parallel.sharding import LinearShard
from gpu_engine.quant.activation import ActQuant, QuantizedActivation
from gpu_engine.quant.spec import QuantSpec


class QuantLinear(nn.Module):
    """Base of every linear a LinearMethod makes: a [sum(parts), in_features] projection."""

    def __init__(self, in_features: int, parts: list[int]):
        super().__init__()
        if not parts or min(parts) < 1 or in_features < 1:
            raise ValueError(f"a linear needs positive sizes, got in_features={in_features}, parts={parts}")
        self.in_features = in_features
        self.parts = tuple(parts)
        self.out_features = sum(parts)
        self.offsets = tuple(sum(parts[:i]) for i in range(len(parts)))
        self.tp_shard: LinearShard | None = None  # None: the checkpoint's tensors whole

    def shard_axes(self, kind: str) -> tuple[int | None, int | None]:
        """(output axis, input axis) of this linear's checkpoint tensors of `kind`: [out, in]
        weights, [out] biases and scales. A format stored otherwise (INT4 [in, out / 8]) says so."""
        return (0, 1) if kind == "weight" else (0, None)

    @property
    def input_quant(self) -> ActQuant | None:
        """What the op before this linear should hand it: None = a plain tensor."""
        return None

    def expected(self) -> dict[str, str]:
        """kind -> what each part's checkpoint tensor of that kind must be (for error messages)."""
        raise NotImplementedError

    def load(self, part: int, kind: str, tensor: torch.Tensor, name: str) -> None:
        raise NotImplementedError

    def process_after_loading(self) -> None:
        """Called once every expected tensor of every part was loaded."""

    def init_dummy(self, gen: torch.Generator) -> None:
        """Random weights made on the module's device (load_format="dummy")."""
        raise NotImplementedError

    def rows(self, part: int, name: str) -> tuple[int, int]:
        if not 0 <= part < len(self.parts):
            raise ModelLoadError(f"{name}: part {part} of a linear with {len(self.parts)} parts")
        return self.offsets[part], self.parts[part]

    def check_shape(self, name: str, tensor: torch.Tensor, want: tuple[int, ...]) -> None:
        if tuple(tensor.shape) != want:
            raise ModelLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, but config.json implies {want}")


class DenseLinear(QuantLinear):
    """The unquantized linear (what nn.Linear computes), in the model's dtype."""

    def __init__(self, in_features: int, parts: list[int], bias: bool, dtype: torch.dtype):
        super().__init__(in_features, parts)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(self.out_features, dtype=dtype), requires_grad=False)
                     if bias else None)

    def expected(self) -> dict[str, str]:
        d = {"weight": f"[rows, {self.in_features}] floating point"}
        if self.bias is not None:
            d["bias"] = "[rows] floating point"
        return d

    def load(self, part: int, kind: str, tensor: torch.Tensor, name: str) -> None:
        off, rows = self.rows(part, name)
        if kind == "weight":
            self.check_shape(name, tensor, (rows, self.in_features))
            dst = self.weight
        elif kind == "bias" and self.bias is not None:
            self.check_shape(name, tensor, (rows,))
            dst = self.bias
        else:
            raise ModelLoadError(f"tensor {name!r} is not expected: this linear is unquantized "
                                 f"(it takes {', '.join(self.expected())})")
        if not tensor.dtype.is_floating_point or tensor.dtype.itemsize == 1:
            raise ModelLoadError(f"tensor {name!r} has dtype {tensor.dtype}; an unquantized linear "
                                 f"takes 16/32-bit floats (is the checkpoint quantized?)")
        dst.data[off : off + rows].copy_(tensor.to(dst.dtype))

    def init_dummy(self, gen: torch.Generator) -> None:
        self.weight.data.normal_(0.0, 0.02, generator=gen)
        if self.bias is not None:
            self.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, QuantizedActivation):
            raise TypeError("an unquantized linear was handed an FP8 activation")
        return F.linear(x, self.weight, self.bias)


class LinearMethod:
    """Makes a model's linears. The base makes unquantized ones; each quantization method is one
    subclass (fp8.Fp8Method; the AWQ method likewise)."""

    def __init__(self, spec: QuantSpec | None, dtype: torch.dtype):
        self.spec = spec
        self.dtype = dtype

    def create_linear(self, in_features: int, parts: list[int], bias: bool,
                      hf_names: list[str]) -> QuantLinear:
        """A linear of `in_features` inputs whose output rows are the fused `parts` (checkpoint
        modules `hf_names`, one per part). Modules the spec ignores stay unquantized."""
        if len(parts) != len(hf_names):
            raise ValueError(f"{len(parts)} parts but {len(hf_names)} names: {hf_names}")
        if self.spec is not None:
            ignored = [self.spec.ignores(n) for n in hf_names]
            if all(ignored):
                return DenseLinear(in_features, parts, bias, self.dtype)
            if any(ignored):
                raise ModelLoadError(
                    f"the checkpoint quantizes only some of {hf_names}, which this model fuses into "
                    f"one linear (ignored: {[n for n, i in zip(hf_names, ignored) if i]}); "
                    f"quantize all of them or none")
            return self.create_quantized(in_features, parts, bias, hf_names)
        return DenseLinear(in_features, parts, bias, self.dtype)

    def create_quantized(self, in_features: int, parts: list[int], bias: bool,
                         hf_names: list[str]) -> QuantLinear:
        raise NotImplementedError

    min_capability: tuple[int, int] | None = None
    """The oldest CUDA compute capability this method's kernels run on, and what that is called."""
    needs: str = ""

    def check_device(self, device: torch.device) -> None:
        """Raise if this method cannot run on `device` (e.g. FP8 GEMMs need sm_89+)."""
        if device.type != "cuda" or self.min_capability is None:
            return
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < self.min_capability:
            raise ModelLoadError(f"{self.needs}; {torch.cuda.get_device_name(device)} is sm_{major}{minor}")


def quant_linears(model: nn.Module) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


def stored_bytes(module: nn.Module) -> int:
    """Bytes a module stores (weights as stored, with their scales), shared tensors counted once."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())
