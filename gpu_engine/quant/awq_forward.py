"""A dense forward of one DecoderLayer over a batch of calibration sequences, in pieces.

AWQ needs each linear group's inputs and the output of the block it feeds, on whole sequences,
many times over; the paged engine forward is the wrong tool for that. These functions run the
layer's own parameters through the same references the CPU engine uses (taxiway_kernels.reference), on
[B, S, hidden] tensors with causal SDPA. tests/unit/test_awq.py checks the pieces reproduce
CausalLM's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpu_engine.model import DecoderLayer
from taxiway_kernels import reference as R


@dataclass
class LayerInputs:
    """What flows through one layer on the calibration batch (all [B, S, width])."""

    qkv_in: torch.Tensor  # input_layernorm(stream): qkv_proj's input
    o_in: torch.Tensor  # attention output: o_proj's input
    attn_out: torch.Tensor  # o_proj's output
    gate_up_in: torch.Tensor  # post_attention_layernorm(stream + attn_out)
    down_in: torch.Tensor  # silu(gate) * up: down_proj's input
    mlp_out: torch.Tensor  # down_proj's output
    out: torch.Tensor  # the stream after the layer


def attention(layer: DecoderLayer, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, hidden] (already normalized) -> attention output before o_proj, [B, S, q_size]."""
    cfg = layer.cfg
    b, s, _ = x.shape
    q, k, v = layer.qkv_proj(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q = q.reshape(b * s, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b * s, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = R.rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
        k = R.rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
    positions = torch.arange(s, device=x.device).repeat(b)
    q, k = R.apply_rope(q, k, positions, cos_sin)
    q = q.view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)
    k = k.view(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    v = v.transpose(1, 2)
    mask = None
    if cfg.sliding_window is not None:
        pos = torch.arange(s, device=x.device)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - cfg.sliding_window)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                       scale=layer.scale, enable_gqa=cfg.num_heads != cfg.num_kv_heads)
    return o.transpose(1, 2).reshape(b, s, cfg.q_size)


def attention_block(layer: DecoderLayer, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Normalized input -> o_proj output [B, S, hidden]."""
    return layer.o_proj(attention(layer, x, cos_sin))


def mlp_block(layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
    """Normalized input -> down_proj output [B, S, hidden]."""
    return layer.down_proj(R.silu_and_mul(layer.gate_up_proj(x)))


def run_layer(layer: DecoderLayer, stream: torch.Tensor, cos_sin: torch.Tensor) -> LayerInputs:
    """One layer on the residual stream [B, S, hidden], keeping every linear's input."""
    eps = layer.cfg.rms_norm_eps
    qkv_in = R.rms_norm(stream, layer.input_layernorm, eps)
    o_in = attention(layer, qkv_in, cos_sin)
    attn_out = layer.o_proj(o_in)
    mid = stream + attn_out
    gate_up_in = R.rms_norm(mid, layer.post_attention_layernorm, eps)
    down_in = R.silu_and_mul(layer.gate_up_proj(gate_up_in))
    mlp_out = layer.down_proj(down_in)
    return LayerInputs(qkv_in, o_in, attn_out, gate_up_in, down_in, mlp_out, mid + mlp_out)


def dense_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """CausalLM's logits [B, S, vocab] float32 for whole sequences ids [B, S], through run_layer."""
    cos_sin = _cos_sin(model.cfg, ids.shape[1], ids.device)
    stream = model.embed_tokens(ids)
    for layer in model.layers:
        stream = run_layer(layer, stream, cos_sin).out
    return model.compute_logits(R.rms_norm(stream, model.norm, model.cfg.rms_norm_eps))


def _cos_sin(cfg, seq_len: int, device: torch.device) -> torch.Tensor:
    from gpu_engine.model import rope_cos_sin_cache

    return rope_cos_sin_cache(cfg, seq_len, device)
