"""Quantization: formats (spec.py), detection of pre-quantized checkpoints (detect.py), linear
methods (linear.py: the interface; fp8.py: FP8 W8A8), the FP8 KV cache (kv.py) and our own
calibration / export (calibrate.py, export.py; `taxiway quantize`). INT4: formats (int4.py,
int4_checkpoint.py), the INT4 linear (int4_linear.py) and its method (awq_method.py), AWQ
calibration (awq.py, awq_forward.py, awq_export.py; docs/awq.md).

The model is one Llama-family implementation that asks a LinearMethod for each linear."""

from gpu_engine.quant.activation import ActQuant, QuantizedActivation
from gpu_engine.quant.detect import read_checkpoint_quant, resolve_quantization
from gpu_engine.quant.linear import DenseLinear, LinearMethod, QuantLinear, stored_bytes
from gpu_engine.quant.methods import linear_method
from gpu_engine.quant.spec import KV_CACHE_DTYPES, METHODS, QuantSpec

__all__ = [
    "ActQuant", "DenseLinear", "KV_CACHE_DTYPES", "LinearMethod", "METHODS", "QuantLinear",
    "QuantSpec", "QuantizedActivation", "linear_method", "read_checkpoint_quant",
    "resolve_quantization", "stored_bytes",
]
