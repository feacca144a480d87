"""Plain-torch references for every kernel: the CPU engine runs these, and kernel tests compare to them.

Paged KV cache layout (one pair per layer):
    k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim]
A token's slot is `block_id * block_size + offset_in_block`.

A step's batch is flattened: sequence i owns query rows query_start_loc[i]:query_start_loc[i+1]; its
new tokens are the last `q_len` of its `seq_lens[i]` context tokens, so query row j of sequence i sits
at position seq_lens[i] - q_len + j and attends (causally) to context positions 0..that position.
The new tokens' K/V are written into the cache before attention runs, so attention reads only the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32, cast back to x's dtype (as HF Llama does).

    x: [..., hidden]; weight: [hidden].
    """
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual; returns (rms_norm(residual'), residual'). Shapes [T, hidden]."""
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps), new_residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] laid out as [gate | up]; returns silu(gate) * up: [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, "rotate half" (GPT-NeoX / HF Llama) layout, over the whole head_dim.

    q: [T, H, D], k: [T, KVH, D], positions: [T] int64,
    cos_sin_cache: [max_position, D] float32 holding cos in [:, :D/2] and sin in [:, D/2:].
    Computed in float32, returned in q's dtype.
    """
    half = q.shape[-1] // 2
    cs = cos_sin_cache[positions]  # [T, D]
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new tokens' K/V in the paged cache. k, v: [T, KVH, D]; slot_mapping: [T] int64."""
    block_size = k_cache.shape[2]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    k_cache[blocks, :, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, :, offsets] = v.to(v_cache.dtype)


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """One sequence's K or V as [KVH, seq_len, D] from its block table ([num_blocks] int)."""
    num_blocks = -(-seq_len // cache.shape[2])
    blocks = cache[block_table[:num_blocks].long()]  # [nb, KVH, bs, D]
    kvh, d = blocks.shape[1], blocks.shape[3]
    return blocks.permute(1, 0, 2, 3).reshape(kvh, -1, d)[:, :seq_len]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int] | torch.Tensor,
    seq_lens: list[int] | torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of a mixed prefill + decode batch over the paged cache.

    q: [T, H, D]; block_tables: [num_seqs, max_blocks] int32; query_start_loc: [num_seqs + 1];
    seq_lens: [num_seqs] context length including this step's tokens. Returns [T, H, D] in q's dtype.
    With sliding_window w, a query at position p sees keys at positions > p - w (HF semantics).
    """
    qsl = [int(x) for x in query_start_loc]
    lens = [int(x) for x in seq_lens]
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for i, seq_len in enumerate(lens):
        start, end = qsl[i], qsl[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[i], seq_len).to(q.dtype)
        v = gather_kv(v_cache, block_tables[i], seq_len).to(q.dtype)
        if group > 1:
            k = k.repeat_interleave(group, dim=0)
            v = v.repeat_interleave(group, dim=0)
        qi = q[start:end].transpose(0, 1)  # [H, q_len, D]
        mask = None
        if q_len > 1 or sliding_window is not None:
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            k_pos = torch.arange(seq_len, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        out[start:end] = o.transpose(0, 1)
    return out


def rope_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotate q in place and store rotated k and v in the cache; k itself is left unchanged.

    q: [T, H, D]; k, v: [T, KVH, D]; positions, slot_mapping: [T] int64 (slot -1: padding, skipped).
    """
    q_rot, k_rot = apply_rope(q, k, positions, cos_sin_cache)
    q.copy_(q_rot)
    keep = slot_mapping >= 0
    write_kv(k_rot[keep], v[keep], k_cache, v_cache, slot_mapping[keep])
