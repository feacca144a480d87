"""Tiny random Hugging Face checkpoints of each supported architecture, written once per session.

The fixtures are imported by the conftest of each suite that uses them."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=320, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
}


def make_tiny_checkpoint(arch: str, folder) -> None:
    cfg_cls, model_cls, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_cls)(**TINY, **extra)
    torch.manual_seed(list(ARCHS).index(arch))
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # larger weights than the default init make outputs less repetitive
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for arch in ARCHS:
        make_tiny_checkpoint(arch, root / arch)
        paths[arch] = str(root / arch)
    return paths


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints) -> str:
    return tiny_checkpoints["llama"]
