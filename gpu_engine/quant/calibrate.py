"""Calibration for static FP8 scales: run the unquantized model on fixed text and record the
largest magnitude each linear's input and each layer's K and V reach (and, for GPTQ rounding of
the weights, each linear's input Gram matrix).

Calibration text: by default the Python documentation topics that ship with CPython
(`pydoc_data.topics`, the text `help()` shows): offline, fixed for a Python version, English prose
with code. Quality is measured on other text (bench/quality.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gpu_engine.quant.linear import DenseLinear
from taxiway_kernels import reference as R


def default_calibration_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_samples(tokenizer, text: str | None, num_samples: int, seq_len: int) -> list[list[int]]:
    """`num_samples` token windows of `seq_len` tokens, taken evenly over the text."""
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples}, {seq_len}")
    ids = tokenizer.encode(text if text is not None else default_calibration_text())
    if len(ids) < seq_len:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than seq_len {seq_len}")
    starts = torch.linspace(0, len(ids) - seq_len, num_samples).long().unique().tolist()
    return [ids[s : s + seq_len] for s in starts]


@dataclass
class Amax:
    """Largest |value| seen: per linear (our module name) and per layer for K (after rotary) and V."""

    inputs: dict[str, float] = field(default_factory=dict)
    k: dict[int, float] = field(default_factory=dict)
    v: dict[int, float] = field(default_factory=dict)

    def see(self, table: dict, key, x: torch.Tensor) -> None:
        table[key] = max(table.get(key, 0.0), float(x.detach().abs().amax()))


class Hessians:
    """Per linear (our module name): the sum of x^T x over its calibration inputs, and their count;
    hessian(name) is GPTQ's H = 2 X^T X / n."""

    def __init__(self) -> None:
        self.gram: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def see(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if name not in self.gram:
            self.gram[name], self.rows[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device), 0
        self.gram[name].addmm_(x.t(), x)
        self.rows[name] += x.shape[0]

    def hessian(self, name: str) -> torch.Tensor:  # [K, K] float32
        return 2 * self.gram[name] / self.rows[name]


class _RecordingOps:
    """Wraps the runner's ops: records K (rotated) and V of the layer that runs, then delegates."""

    def __init__(self, inner, amax: Amax):
        self.inner, self.amax, self.layer = inner, amax, -1
        self.name = inner.name

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def rope_and_write_kv(self, q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta, kv_scale=(1.0, 1.0)):
        _, k_rot = R.apply_rope(q, k, positions, cos_sin_cache)
        self.amax.see(self.amax.k, self.layer, k_rot)
        self.amax.see(self.amax.v, self.layer, v)
        return self.inner.rope_and_write_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta, kv_scale)


def collect_amax(llm, samples: list[list[int]], batch: int = 8, progress: bool = True,
                 hessians: Hessians | None = None) -> Amax:
    """Run every sample through `llm` (an unquantized taxiway.LLM), one prefill each; with
    `hessians`, also sum each linear's input Gram matrix into it (for GPTQ rounding)."""
    from gpu_engine.sampling_params import SamplingParams

    model, runner = llm.engine.runner.model, llm.engine.runner
    amax = Amax()
    ops = _RecordingOps(runner.ops, amax)
    hooks = []
    for i, layer in enumerate(model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda _m, _a, i=i: setattr(ops, "layer", i)))
    for name, module in model.named_modules():
        if isinstance(module, DenseLinear) and name.startswith("layers."):
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: amax.see(amax.inputs, name, args[0])))
            if hessians is not None:
                hooks.append(module.register_forward_pre_hook(
                    lambda _m, args, name=name: hessians.see(name, args[0])))
    runner.ops = ops
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    try:
        for b in tqdm(range(0, len(samples), batch), desc="Calibrating", unit="batch", disable=not progress):
            llm.generate(samples[b : b + batch], params)
    finally:
        runner.ops = ops.inner
        for h in hooks:
            h.remove()
    return amax


def read_text(path: str | Path | None) -> str | None:
    return None if path is None else Path(path).read_text()
