"""The EAGLE-3 draft head in the published layout (yuhuili/EAGLE3-*, SpecForge; what vLLM's and
SGLang's `LlamaForCausalLMEagle3` loaders read): read, checked against the target, and written.

Layout (config.json + safetensors):
    fc.weight                      [H, 3 * Ht]  projects the target's low, middle and high hidden states
    midlayer.input_layernorm       [H]          on the token embedding
    midlayer.hidden_norm           [H]          on the (projected or the head's own previous) hidden state
    midlayer.self_attn.{q,k,v}_proj [*, 2H]     attention over [embedding; hidden]
    midlayer.self_attn.o_proj, midlayer.post_attention_layernorm, midlayer.mlp.{gate,up,down}_proj
    norm.weight                    [H]
    lm_head.weight                 [Vd, H]      over the reduced draft vocabulary
    d2t                            [Vd] int64   target id of draft id i is i + d2t[i]
    t2d                            [V] bool     which target ids are in the draft vocabulary
    embed_tokens.weight            [V, H]       optional: else the target's embedding is used
config.json: a Llama config with num_hidden_layers 1, vocab_size V (the target's), draft_vocab_size
Vd, optionally target_hidden_size Ht, and which target layers feed fc: a top-level
`eagle_aux_hidden_state_layer_ids` (vLLM: the residual stream entering those layers) or
`eagle_config.eagle_aux_hidden_state_layer_ids` (SGLang: the output of those layers, one earlier).
Without either, layers (2, L // 2, L - 3) of an L-layer target, as EAGLE-3 trains them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from gpu_engine.config import ModelConfig
from gpu_engine.errors import ModelLoadError
from gpu_engine.ops import AttentionMetadata, TorchOps

ARCHITECTURE = "LlamaForCausalLMEagle3"


def default_aux_layers(num_target_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's choice: the residual stream entering layers 2, L // 2 and L - 3 (clamped into
    range for targets of fewer than 3 layers, which only tests have)."""
    top = num_target_layers - 1
    return tuple(min(max(i, 0), top) for i in (2, num_target_layers // 2, num_target_layers - 3))


@dataclass(frozen=True)
class Eagle3Config:
    """The head's shape, and how it connects to its target."""

    layer: ModelConfig
    """The decoder layer's shape (a one-layer Llama): hidden size, heads, rope, eps."""
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    aux_layers: tuple[int, ...]
    """Target layers whose entering residual stream feeds fc, in fc's input order."""
    norm_before_residual: bool = False

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], target: ModelConfig, name: str = "") -> "Eagle3Config":
        where = name or "the EAGLE-3 head"
        if int(cfg.get("num_hidden_layers", 1)) != 1:
            raise ModelLoadError(f"{where}: num_hidden_layers is {cfg['num_hidden_layers']}; only "
                                 "one-layer EAGLE-3 heads are supported")
        layer = ModelConfig.from_dict({**cfg, "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1},
                                      name=name)
        vocab = int(cfg.get("vocab_size", target.vocab_size))
        if vocab != target.vocab_size:
            raise ModelLoadError(f"{where}: vocab_size {vocab} differs from the target's "
                                 f"{target.vocab_size}: the head was trained for another tokenizer")
        draft_vocab = int(cfg.get("draft_vocab_size") or vocab)
        if not 1 <= draft_vocab <= vocab:
            raise ModelLoadError(f"{where}: draft_vocab_size {draft_vocab} must be in [1, {vocab}]")
        target_hidden = int(cfg.get("target_hidden_size") or layer.hidden_size)
        if target_hidden != target.hidden_size:
            raise ModelLoadError(f"{where}: target_hidden_size {target_hidden} differs from the "
                                 f"target's hidden_size {target.hidden_size}")
        return cls(layer=layer, vocab_size=vocab, draft_vocab_size=draft_vocab,
                   target_hidden_size=target_hidden, aux_layers=_aux_layers(cfg, target, where),
                   norm_before_residual=bool(cfg.get("norm_before_residual", False)))

    def to_dict(self, target: ModelConfig) -> dict[str, Any]:
        """config.json of the published layout (aux layer ids written only when not the default)."""
        c = self.layer
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURE], "model_type": "llama", "num_hidden_layers": 1,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
            "max_position_embeddings": c.max_position_embeddings, "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size, "target_hidden_size": self.target_hidden_size,
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": target.bos_token_id,
            "eos_token_id": list(target.eos_token_ids) if len(target.eos_token_ids) != 1 else target.eos_token_ids[0],
            "torch_dtype": "bfloat16",
        }
        if self.aux_layers != default_aux_layers(target.num_layers):
            out["eagle_aux_hidden_state_layer_ids"] = list(self.aux_layers)
        return out


def _aux_layers(cfg: dict[str, Any], target: ModelConfig, where: str) -> tuple[int, ...]:
    top = cfg.get("eagle_aux_hidden_state_layer_ids")
    nested = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    entering = [int(i) for i in top] if top else None
    from_outputs = [int(i) + 1 for i in nested] if nested else None  # output of i enters i + 1
    if entering and from_outputs and entering != from_outputs:
        raise ModelLoadError(f"{where}: eagle_aux_hidden_state_layer_ids {top} (layers entered) and "
                             f"eagle_config's {nested} (layer outputs) disagree")
    layers = tuple(entering or from_outputs or default_aux_layers(target.num_layers))
    if len(layers) != 3:
        raise ModelLoadError(f"{where}: needs 3 auxiliary target layers, got {list(layers)}")
    bad = [i for i in layers if not 0 <= i < target.num_layers]
    if bad:
        raise ModelLoadError(f"{where}: auxiliary layers {bad} are outside the target's "
                             f"{target.num_layers} layers")
    return layers


DUMMY_HEAD_SEED = 2
"""Seeds a dummy head's weights (load_format "dummy")."""


class Eagle3Head(nn.Module):
    """One EAGLE-3 decoder layer over [embedding; hidden], its norms, and the draft-vocabulary head."""

    def __init__(self, cfg: Eagle3Config, own_embedding: bool):
        super().__init__()
        self.cfg = cfg
        c = cfg.layer
        h, inter = c.hidden_size, c.intermediate_size
        self.fc = nn.Linear(len(cfg.aux_layers) * cfg.target_hidden_size, h, bias=False)
        self.input_layernorm = nn.Parameter(torch.ones(h))
        self.hidden_norm = nn.Parameter(torch.ones(h))
        self.qkv_proj = nn.Linear(2 * h, c.q_size + 2 * c.kv_size, bias=False)
        self.o_proj = nn.Linear(c.q_size, h, bias=False)
        self.post_attention_layernorm = nn.Parameter(torch.ones(h))
        self.gate_up_proj = nn.Linear(h, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)
        self.norm = nn.Parameter(torch.ones(h))
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h) if own_embedding else None
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
        self.scale = c.head_dim**-0.5

    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """The draft vocabulary: target_ids [Vd] int64, ascending; fills d2t and t2d."""
        ids = target_ids.to(self.d2t.device, torch.int64)
        if ids.shape != self.d2t.shape or (ids.diff() <= 0).any():
            raise ValueError(f"draft vocabulary must be {self.d2t.shape[0]} ascending target ids")
        self.d2t.copy_(ids - torch.arange(ids.shape[0], device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    def target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids -> target ids (same shape)."""
        return draft_ids + self.d2t[draft_ids]

    def forward(
        self,
        embeds: torch.Tensor,  # [T, H] token embeddings (the target's, or the head's own)
        hidden: torch.Tensor,  # [T, H] fc(aux) of the target, or the head's previous prenorm output
        positions: torch.Tensor,  # [T] int64
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cos_sin: torch.Tensor,
        ops: TorchOps,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed [T, H] for the draft logits, prenorm [T, H] for the next draft step)."""
        c = self.cfg.layer
        eps = c.rms_norm_eps
        t = embeds.shape[0]
        e = ops.rms_norm(embeds, self.input_layernorm, eps)
        h = ops.rms_norm(hidden, self.hidden_norm, eps)
        residual = h if self.cfg.norm_before_residual else hidden
        x = torch.cat([e, h], dim=-1)
        q, k, v = self.qkv_proj(x).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.reshape(t, c.num_heads, c.head_dim)
        k = k.reshape(t, c.num_kv_heads, c.head_dim)
        v = v.reshape(t, c.num_kv_heads, c.head_dim)
        k_cache, v_cache = kv_cache
        q = ops.rope_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, meta)
        attn = ops.attention(q, k_cache, v_cache, meta, self.scale, None)
        a = self.o_proj(attn.reshape(t, c.q_size))
        a, residual = ops.fused_add_rms_norm(a, residual, self.post_attention_layernorm, eps)
        m = self.down_proj(ops.silu_and_mul(self.gate_up_proj(a)))
        return ops.fused_add_rms_norm(m, residual, self.norm, eps)

    def draft_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """normed [S, H] -> [S, Vd] float32."""
        return self.lm_head(normed).float()


# -- the published layout <-> our parameters --------------------------------------------------------
def _targets(cfg: Eagle3Config, own_embedding: bool) -> dict[str, tuple[str, int, int]]:
    """Published tensor name -> (our name, row offset, rows)."""
    c = cfg.layer
    q, kv, inter, h = c.q_size, c.kv_size, c.intermediate_size, c.hidden_size
    out = {
        "fc.weight": ("fc.weight", 0, h),
        "midlayer.input_layernorm.weight": ("input_layernorm", 0, h),
        "midlayer.hidden_norm.weight": ("hidden_norm", 0, h),
        "midlayer.self_attn.q_proj.weight": ("qkv_proj.weight", 0, q),
        "midlayer.self_attn.k_proj.weight": ("qkv_proj.weight", q, kv),
        "midlayer.self_attn.v_proj.weight": ("qkv_proj.weight", q + kv, kv),
        "midlayer.self_attn.o_proj.weight": ("o_proj.weight", 0, h),
        "midlayer.post_attention_layernorm.weight": ("post_attention_layernorm", 0, h),
        "midlayer.mlp.gate_proj.weight": ("gate_up_proj.weight", 0, inter),
        "midlayer.mlp.up_proj.weight": ("gate_up_proj.weight", inter, inter),
        "midlayer.mlp.down_proj.weight": ("down_proj.weight", 0, h),
        "norm.weight": ("norm", 0, h),
        "lm_head.weight": ("lm_head.weight", 0, cfg.draft_vocab_size),
        "d2t": ("d2t", 0, cfg.draft_vocab_size),
        "t2d": ("t2d", 0, cfg.vocab_size),
    }
    if own_embedding:
        out["embed_tokens.weight"] = ("embed_tokens.weight", 0, cfg.vocab_size)
    return out


def _canonical(name: str) -> str:
    """Accept the spellings in circulation: a "model." prefix, "layers.0." for "midlayer."."""
    name = name.removeprefix("model.")
    return "midlayer." + name[len("layers.0."):] if name.startswith("layers.0.") else name


def read_head_config(folder: Path, target: ModelConfig) -> Eagle3Config:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"no config.json in the EAGLE-3 head folder {folder}")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {exc}") from exc
    arch = (raw.get("architectures") or [ARCHITECTURE])[0]
    if "eagle3" not in arch.lower():
        raise ModelLoadError(f"{cfg_file}: architecture {arch!r} is not an EAGLE-3 head "
                             f"(expected {ARCHITECTURE})")
    return Eagle3Config.from_dict(raw, target, name=str(folder))


def load_eagle3_head(folder: str | Path, target: ModelConfig, dtype: torch.dtype,
                     device: torch.device, dummy: bool = False) -> Eagle3Head:
    """Read a head in the published layout, checking every tensor's name and shape. `dummy`: a
    random head of the folder's config.json (N(0, 0.02) matrices, unit norms, the target's
    embedding, the first draft_vocab_size target ids as its vocabulary), for benchmarks."""
    from gpu_engine.weights import checkpoint_files

    folder = Path(folder).expanduser()
    cfg = read_head_config(folder, target)
    if dummy:
        return _finish(_dummy_head(cfg, device), folder, dtype, device, set())
    tensors: dict[str, tuple[str, torch.Tensor]] = {}
    for path in checkpoint_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[_canonical(name)] = (path.name, f.get_tensor(name))
    own_embedding = "embed_tokens.weight" in tensors
    with torch.device("meta"):
        head = Eagle3Head(cfg, own_embedding)
    head = head.to_empty(device=device)
    targets = _targets(cfg, own_embedding)
    optional = {"d2t", "t2d"} if cfg.draft_vocab_size == cfg.vocab_size else {"t2d"}
    params = {**dict(head.named_parameters()), **dict(head.named_buffers())}
    for name, (file, tensor) in tensors.items():
        if name not in targets:
            raise ModelLoadError(f"{folder / file}: tensor {name!r} is not part of an EAGLE-3 head "
                                 f"(expected: {', '.join(sorted(targets))})")
        dst, off, rows = targets[name]
        param = params[dst]
        want = (rows, *param.shape[1:])
        if tuple(tensor.shape) != want:
            raise ModelLoadError(f"{folder / file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"but config.json and the target imply {want}")
        param.data[off : off + rows].copy_(tensor.to(param.dtype))
    missing = sorted(set(targets) - set(tensors) - optional)
    if missing:
        raise ModelLoadError(f"EAGLE-3 head in {folder} lacks tensors: {', '.join(missing)}")
    return _finish(head, folder, dtype, device, set(tensors))


def _dummy_head(cfg: Eagle3Config, device: torch.device) -> Eagle3Head:
    with torch.device(device):
        head = Eagle3Head(cfg, own_embedding=False)
    gen = torch.Generator(device=device).manual_seed(DUMMY_HEAD_SEED)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=gen)  # the 1-D parameters are norms: ones already
    return head


def _finish(head: Eagle3Head, folder: Path, dtype: torch.dtype, device: torch.device, read: set[str]) -> Eagle3Head:
    """The vocabulary maps a checkpoint left out (d2t: the first draft_vocab_size ids), checked;
    parameters in `dtype`; inference mode."""
    if "d2t" not in read:
        head.d2t.zero_()  # the draft vocabulary is the first draft_vocab_size target ids
    if "t2d" not in read:
        head.t2d.zero_()
        head.t2d[head.target_ids(torch.arange(head.cfg.draft_vocab_size, device=device))] = True
    _check_vocab_map(head, folder)
    for p in head.parameters():
        p.data = p.data.to(dtype)
    return head.eval().requires_grad_(False)


def _check_vocab_map(head: Eagle3Head, folder: Path) -> None:
    ids = head.target_ids(torch.arange(head.cfg.draft_vocab_size, device=head.d2t.device))
    if ids.min() < 0 or ids.max() >= head.cfg.vocab_size:
        raise ModelLoadError(f"{folder}: d2t maps draft ids outside the target vocabulary "
                             f"[0, {head.cfg.vocab_size})")
    if int(head.t2d.sum()) != head.cfg.draft_vocab_size or not bool(head.t2d[ids].all()):
        raise ModelLoadError(f"{folder}: t2d does not mark exactly the {head.cfg.draft_vocab_size} "
                             "target ids that d2t maps to")


def save_eagle3_head(head: Eagle3Head, folder: str | Path, target: ModelConfig,
                     dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write config.json + model.safetensors in the published layout; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = {**dict(head.named_parameters()), **dict(head.named_buffers())}
    out = {}
    for name, (src, off, rows) in _targets(head.cfg, head.embed_tokens is not None).items():
        t = params[src].detach()[off : off + rows]
        out[name] = (t if name in ("d2t", "t2d") else t.to(dtype)).contiguous().cpu()
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = head.cfg.to_dict(target)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder
