"""Quantization: checkpoint formats, quantized linear methods and calibration (issue 9)."""
