"""EAGLE-3's training-time test: the head unrolled over several draft steps on whole sequences,
each step fed the head's own previous outputs, in plain (differentiable) torch.

Step i at position t is exactly what chain drafting computes at position t + i after the target
verified tokens up to t + 1: input token x_{t+1+i}; hidden state fc(target aux at t) for i = 0,
else the head's step i - 1 output at t; rotary position t + i; it attends to step 0's keys at
positions 0..t (the target's real features) and to its own chain, steps 1..i at t. It predicts
x_{t+2+i}. tests/engine/test_spec_eagle3.py checks this against the paged proposer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu_engine.spec.eagle3 import Eagle3Head
from taxiway_kernels import reference


def ttt_forward(
    head: Eagle3Head,
    embed: torch.nn.Embedding,
    aux: torch.Tensor,  # [B, L, 3 * Ht] the target's auxiliary hidden states
    tokens: torch.Tensor,  # [B, L] int64 (padding: any id)
    steps: int,
    cos_sin: torch.Tensor,  # [>= L + steps, head_dim] float32 (rope_cos_sin_cache of the head)
) -> list[torch.Tensor]:
    """Draft logits of each unrolled step: `steps` tensors [B, L, Vd] float32."""
    c = head.cfg.layer
    b, length = tokens.shape
    eps = c.rms_norm_eps
    hidden = head.fc(aux)
    pos = torch.arange(length, device=tokens.device)
    causal = pos[None, :] <= pos[:, None]  # [L(query), L(key)]
    keys0 = values0 = None
    chain_k: list[torch.Tensor] = []
    chain_v: list[torch.Tensor] = []
    out = []
    for i in range(steps):
        ids = F.pad(tokens[:, 1 + i :], (0, 1 + i))  # x_{t+1+i}
        e = reference.rms_norm(embed(ids).to(hidden.dtype), head.input_layernorm, eps)
        h = reference.rms_norm(hidden, head.hidden_norm, eps)
        residual = h if head.cfg.norm_before_residual else hidden
        q, k, v = head.qkv_proj(torch.cat([e, h], dim=-1)).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.reshape(b * length, c.num_heads, c.head_dim)
        k = k.reshape(b * length, c.num_kv_heads, c.head_dim)
        q, k = reference.apply_rope(q, k, (pos + i).repeat(b), cos_sin)
        q = q.reshape(b, length, c.num_heads, c.head_dim).transpose(1, 2)  # [B, H, L, D]
        k = _expand(k.reshape(b, length, c.num_kv_heads, c.head_dim), c.num_heads)
        v = _expand(v.reshape(b, length, c.num_kv_heads, c.head_dim), c.num_heads)
        if i == 0:
            keys0, values0 = k, v
        else:
            chain_k.append(k)
            chain_v.append(v)
        attn = _attend(q, keys0, values0, chain_k, chain_v, causal, head.scale)
        a = head.o_proj(attn.transpose(1, 2).reshape(b, length, c.q_size))
        residual = residual + a
        m = head.down_proj(reference.silu_and_mul(head.gate_up_proj(reference.rms_norm(
            residual, head.post_attention_layernorm, eps))))
        hidden = residual + m
        out.append(head.draft_logits(reference.rms_norm(hidden, head.norm, eps)))
    return out


def _expand(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, KVH, D] -> [B, H, L, D] (grouped-query heads repeated)."""
    x = x.transpose(1, 2)
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def _attend(q, k0, v0, chain_k, chain_v, causal, scale):
    """Softmax over step 0's keys (causal) and each chain step's key at the query's own position."""
    scores = [(q @ k0.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))]
    scores += [((q * kj).sum(-1) * scale)[..., None] for kj in chain_k]
    probs = torch.cat(scores, dim=-1).float().softmax(dim=-1).to(q.dtype)
    length = k0.shape[2]
    out = probs[..., :length] @ v0
    for j, vj in enumerate(chain_v):
        out = out + probs[..., length + j : length + j + 1] * vj
    return out
