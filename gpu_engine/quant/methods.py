"""Which LinearMethod serves which QuantSpec.method. A new method is one class in its own module,
named here."""

from __future__ import annotations

import importlib

import torch

from gpu_engine.errors import ModelLoadError
from gpu_engine.quant.linear import LinearMethod
from gpu_engine.quant.spec import QuantSpec

_METHODS = {
    "fp8": ("gpu_engine.quant.fp8", "Fp8Method"),
    "awq": ("gpu_engine.quant.awq_method", "AwqMethod"),
}


def method_class(name: str) -> type[LinearMethod]:
    if name not in _METHODS:
        raise ModelLoadError(f"quantization {name!r} is not supported (supported: {', '.join(_METHODS)})")
    module, cls = _METHODS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"the {name} linear method ({module}.{cls}) is not available in this build: {exc}") from exc


def linear_method(spec: QuantSpec | None, dtype: torch.dtype) -> LinearMethod:
    """The method that makes the model's linears: unquantized without a spec."""
    if spec is None:
        return LinearMethod(None, dtype)
    return method_class(spec.method)(spec, dtype)
