"""Helpers for the speculative-decoding tests: a tiny target on the CPU, EAGLE-3 heads written in
the published layout (tensor names of yuhuili/EAGLE3-*), and the target's features."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from gpu_engine.config import ModelConfig
from gpu_engine.model import rope_cos_sin_cache
from gpu_engine.ops import TorchOps
from gpu_engine.spec.features import target_features
from gpu_engine.weights import build_model, load_checkpoint

CPU = torch.device("cpu")


def load_target(folder: str):
    cfg = ModelConfig.from_folder(folder)
    model = build_model(cfg, torch.float32, CPU)
    load_checkpoint(model, Path(folder), cfg, progress=False)
    return model, cfg


def features(model, sequences, aux_layers):
    cos_sin = rope_cos_sin_cache(model.cfg, 512, CPU)
    return target_features(model, TorchOps(), cos_sin, sequences, aux_layers)


def head_config(target: ModelConfig, draft_vocab: int, **extra) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
        "hidden_size": target.hidden_size, "intermediate_size": 96,
        "num_attention_heads": target.num_heads, "num_key_value_heads": target.num_kv_heads,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "vocab_size": target.vocab_size, "draft_vocab_size": draft_vocab, "tie_word_embeddings": False,
        "eagle_aux_hidden_state_layer_ids": [0, 1, 1],
    }
    cfg.update(extra)
    return cfg


def published_tensors(cfg: dict, target: ModelConfig, seed: int = 0, own_embedding: bool = False):
    """Random tensors of a head, under the published names."""
    g = torch.Generator().manual_seed(seed)
    h, inter, vd = cfg["hidden_size"], cfg["intermediate_size"], cfg["draft_vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd

    def w(*shape, scale=0.15):
        return torch.randn(*shape, generator=g) * scale

    ids = torch.randperm(target.vocab_size, generator=g)[:vd].sort().values
    t = {
        "fc.weight": w(h, 3 * target.hidden_size),
        "midlayer.input_layernorm.weight": 1 + w(h, scale=0.1),
        "midlayer.hidden_norm.weight": 1 + w(h, scale=0.1),
        "midlayer.self_attn.q_proj.weight": w(h, 2 * h),
        "midlayer.self_attn.k_proj.weight": w(kv, 2 * h),
        "midlayer.self_attn.v_proj.weight": w(kv, 2 * h),
        "midlayer.self_attn.o_proj.weight": w(h, h),
        "midlayer.post_attention_layernorm.weight": 1 + w(h, scale=0.1),
        "midlayer.mlp.gate_proj.weight": w(inter, h),
        "midlayer.mlp.up_proj.weight": w(inter, h),
        "midlayer.mlp.down_proj.weight": w(h, inter),
        "norm.weight": 1 + w(h, scale=0.1),
        "lm_head.weight": w(vd, h, scale=0.5),
        "d2t": ids - torch.arange(vd),
        "t2d": torch.zeros(target.vocab_size, dtype=torch.bool).index_fill_(0, ids, True),
    }
    if own_embedding:
        t["embed_tokens.weight"] = w(target.vocab_size, h)
    return t


def write_head(folder: Path, cfg: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def random_head(target_folder: str, folder: Path) -> str:
    """A random EAGLE-3 head in the published layout (draft vocabulary 100) for a target, in folder/head."""
    cfg = ModelConfig.from_folder(target_folder)
    hcfg = head_config(cfg, 100)
    return str(write_head(folder / "head", hcfg, published_tensors(hcfg, cfg)))


ALWAYS = {"disable_when_slower": False}
"""Speculate at every step the batch-size threshold allows, whatever the gate would measure: tests
that count drafts must not depend on the machine's timing."""

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3, **ALWAYS}


def generate_checked(llm, prompts, params):
    """llm.generate, stepping the engine by hand: the block pool's integrity (against every running
    sequence's table) and the batch rows are checked after every step. Outputs in prompt order."""
    from dataclasses import replace

    from gpu_engine.sampling_params import OutputKind

    engine = llm.engine
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, replace(p, output_kind=OutputKind.FINAL_ONLY))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
        sched = engine.scheduler
        engine.block_manager.check_integrity([b for s in sched.running for b in s.block_table])
        sched.batch.check(sched.running)
    return [done[str(i)] for i in range(len(prompts))]


def tokens_of(outputs):
    return [o.outputs[0].token_ids for o in outputs]
