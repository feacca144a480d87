"""What a decode step must read from device memory, counted from the model it runs: the physical
limit of decode speed is these bytes over the memory bandwidth (../shared/BENCHMARKS.md).

Counted: every weight as stored (a module that knows its stored size, such as a quantized linear
with its scales and zero points, says so through `stored_bytes()`; any other module counts its
own parameters and buffers), ONE embedding row per sequence (not the table; a tied lm_head still
reads the whole table, as a linear), and the K/V of every attended position.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class DecodeBytes:
    weights: int
    """Bytes of every weight read once per step (linears as stored, lm_head, norms)."""
    embedding_rows: int
    """One embedding row per sequence of the step."""
    kv: int
    """K and V of every position the step's sequences attend to."""

    @property
    def total(self) -> int:
        return self.weights + self.embedding_rows + self.kv


def decode_step_bytes(model: nn.Module, batch: int, kv_bytes_per_token: int, context_tokens: float) -> DecodeBytes:
    """Bytes one decode step of `batch` sequences reads, each attending to `context_tokens`
    positions (mean) with `kv_bytes_per_token` of K/V per position (all layers)."""
    if batch < 1 or context_tokens < 0 or kv_bytes_per_token < 0:
        raise ValueError(f"need batch >= 1, context_tokens >= 0, kv_bytes_per_token >= 0; got "
                         f"{batch}, {context_tokens}, {kv_bytes_per_token}")
    weights, row = _module_bytes(model, set())
    return DecodeBytes(weights=weights, embedding_rows=batch * row,
                       kv=int(round(batch * context_tokens * kv_bytes_per_token)))


def _module_bytes(module: nn.Module, seen: set[int]) -> tuple[int, int]:
    """(weight bytes read in full, bytes of one embedding row) of a module tree; shared tensors
    (tied weights) count once."""
    stored = getattr(module, "stored_bytes", None)
    if callable(stored):
        for t in list(module.parameters()) + list(module.buffers()):
            seen.add(id(t))
        return int(stored()), 0
    if isinstance(module, nn.Embedding):
        w = module.weight
        return 0, w.shape[1] * w.element_size()
    weights = 0
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if id(t) not in seen:
            seen.add(id(t))
            weights += t.numel() * t.element_size()
    row = 0
    for child in module.children():
        w, r = _module_bytes(child, seen)
        weights += w
        row += r
    return weights, row


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, element_size: int) -> int:
    """K and V of one position, all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * element_size
