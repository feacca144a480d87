"""One Llama-family model (Llama 2/3/3.1, Mistral, Qwen2, Qwen3, SmolLM2); differences are config flags.

Its linears come from a LinearMethod (gpu_engine/quant): unquantized, or quantized (FP8...). A
quantized linear says what input it wants (`input_quant`); the op before it (RMSNorm, SiLU-and-mul,
or a quantize op after attention) produces that directly. The KV cache may be FP8 with per-layer
scales (`kv_scale`, set by the loader)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpu_engine.config import ModelConfig
from gpu_engine.ops import AttentionMetadata, TorchOps
from gpu_engine.parallel.sharding import column_shard, even, kv_heads, row_shard
from gpu_engine.parallel.state import TPShard, all_gather_last_dim, all_reduce
from gpu_engine.quant.linear import DenseLinear, LinearMethod


def rope_cos_sin_cache(cfg: ModelConfig, max_len: int, device: torch.device) -> torch.Tensor:
    """[max_len, head_dim] float32: cos of each position's angles in the first half, sin in the second."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    elif scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    positions = torch.arange(max_len, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


def _llama3_scaled(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _norm_weight(n: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.ones(n, dtype=dtype), requires_grad=False)


class DecoderLayer(nn.Module):
    """One layer; under tensor parallelism it holds its rank's heads and intermediate columns
    (gpu_engine/parallel/sharding.py) and sums o_proj and down_proj over ranks."""

    def __init__(self, cfg: ModelConfig, index: int, method: LinearMethod, shard: TPShard = TPShard()):
        super().__init__()
        self.cfg = cfg
        h, dt, d = cfg.hidden_size, method.dtype, cfg.head_dim
        heads, kv = even(cfg.num_heads, shard), kv_heads(cfg, shard)
        inter = even(cfg.intermediate_size, shard)
        self.num_heads, self.num_kv_heads = heads[1], kv[1]
        self.q_size, self.kv_size = heads[1] * d, kv[1] * d
        q_rows, kv_rows = tuple(x * d for x in heads), tuple(x * d for x in kv)
        hf = f"model.layers.{index}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        self.input_layernorm = _norm_weight(h, dt)
        self.post_attention_layernorm = _norm_weight(h, dt)
        self.qkv_proj = method.create_linear(h, [self.q_size, self.kv_size, self.kv_size], cfg.qkv_bias,
                                             [attn + "q_proj", attn + "k_proj", attn + "v_proj"])
        self.qkv_proj.tp_shard = column_shard([q_rows, kv_rows, kv_rows])
        self.o_proj = method.create_linear(self.q_size, [h], cfg.o_bias, [attn + "o_proj"])
        self.o_proj.tp_shard = row_shard(q_rows)
        self.gate_up_proj = method.create_linear(h, [inter[1], inter[1]], cfg.mlp_bias,
                                                 [mlp + "gate_proj", mlp + "up_proj"])
        self.gate_up_proj.tp_shard = column_shard([inter, inter])
        self.down_proj = method.create_linear(inter[1], [h], cfg.mlp_bias, [mlp + "down_proj"])
        self.down_proj.tp_shard = row_shard(inter)
        if cfg.qk_norm:
            self.q_norm = _norm_weight(d, dt)
            self.k_norm = _norm_weight(d, dt)
        self.scale = d**-0.5
        self.kv_scale: tuple[float, float] = (1.0, 1.0)  # (k_scale, v_scale) of an FP8 KV cache

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        residual: torch.Tensor | None,  # [T, hidden]
        positions: torch.Tensor,  # [T] int64
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cos_sin: torch.Tensor,
        ops: TorchOps,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, residual = self.attention_inputs(hidden, residual, positions, kv_cache, meta, cos_sin, ops)
        k_cache, v_cache = kv_cache
        attn = ops.attention(q, k_cache, v_cache, meta, self.scale, self.cfg.sliding_window, self.kv_scale)
        return self.after_attention(attn, residual, ops)

    def attention_inputs(self, hidden, residual, positions, kv_cache, meta: AttentionMetadata, cos_sin,
                         ops: TorchOps) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer up to attention: norm, qkv, rope, this step's K and V written to the cache
        (only meta.slot_mapping is read). Returns (q [T, heads, head_dim], residual)."""
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        want = self.qkv_proj.input_quant
        if residual is None:
            residual = hidden
            hidden = ops.rms_norm(hidden, self.input_layernorm, eps, quant=want)
        else:
            hidden, residual = ops.fused_add_rms_norm(hidden, residual, self.input_layernorm, eps, quant=want)
        t = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, cfg.head_dim)
        k = k.view(t, self.num_kv_heads, cfg.head_dim)
        v = v.view(t, self.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = ops.rms_norm(q, self.q_norm, eps)
            k = ops.rms_norm(k, self.k_norm, eps)
        k_cache, v_cache = kv_cache
        q = ops.rope_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, meta, self.kv_scale)
        return q, residual

    def after_attention(self, attn: torch.Tensor, residual: torch.Tensor,
                        ops: TorchOps) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer after attention (attn: [T, heads, head_dim]): o_proj, norm, MLP."""
        t = attn.shape[0]
        hidden = all_reduce(self.o_proj(ops.quantize(attn.reshape(t, self.q_size), self.o_proj.input_quant)))
        hidden, residual = ops.fused_add_rms_norm(hidden, residual, self.post_attention_layernorm,
                                                  self.cfg.rms_norm_eps, quant=self.gate_up_proj.input_quant)
        act = ops.silu_and_mul(self.gate_up_proj(hidden), quant=self.down_proj.input_quant)
        return all_reduce(self.down_proj(act)), residual


class VocabEmbedding(nn.Embedding):
    """The token embedding; under tensor parallelism each rank holds an even share of the
    vocabulary's rows, looks up the ids that fall in it and the ranks' rows are summed."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, shard: TPShard):
        start, num_rows, _ = even(cfg.vocab_size, shard)
        super().__init__(num_rows, cfg.hidden_size, dtype=dtype)
        self.start, self.sharded = start, shard.world > 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [...] int64 -> [..., hidden]
        if not self.sharded:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(rows.masked_fill_(outside.unsqueeze(-1), 0.0))


class CausalLM(nn.Module):
    """Embedding, decoder layers over the paged KV cache, final norm, LM head."""

    def __init__(self, cfg: ModelConfig, method: LinearMethod, shard: TPShard = TPShard()):
        super().__init__()
        self.cfg = cfg
        self.shard = shard
        dt = method.dtype
        self.embed_tokens = VocabEmbedding(cfg, dt, shard)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, method, shard) for i in range(cfg.num_layers))
        self.norm = _norm_weight(cfg.hidden_size, dt)
        vocab = even(cfg.vocab_size, shard)
        self.lm_head = DenseLinear(cfg.hidden_size, [vocab[1]], False, dt)  # never quantized
        self.lm_head.tp_shard = column_shard([vocab])
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        cos_sin: torch.Tensor,
        ops: TorchOps,
    ) -> torch.Tensor:  # [T, hidden]
        return self.forward_aux(input_ids, positions, kv_caches, meta, cos_sin, ops, ())[0]

    def forward_aux(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        cos_sin: torch.Tensor,
        ops: TorchOps,
        aux_layers: tuple[int, ...],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward, also returning the residual stream entering each layer of `aux_layers`
        (EAGLE-3 drafts from them), concatenated: [T, len(aux_layers) * hidden] (None if none)."""
        hidden = self.embed_tokens(input_ids)
        residual = None
        seen: dict[int, torch.Tensor] = {}
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
            if i in aux_layers:  # a copy: the fused norms work in place
                seen[i] = hidden.clone() if residual is None else hidden + residual
            hidden, residual = layer(hidden, residual, positions, kv, meta, cos_sin, ops)
        hidden, _ = ops.fused_add_rms_norm(hidden, residual, self.norm, self.cfg.rms_norm_eps)
        return hidden, torch.cat([seen[i] for i in aux_layers], dim=-1) if aux_layers else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [S, hidden] -> [S, vocab] float32 (the ranks' vocabulary shares gathered)."""
        return all_gather_last_dim(self.lm_head(hidden)).float()
