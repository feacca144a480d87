"""The decode roofline's byte count: weights as stored, one embedding row, the KV attended."""

import pytest
import torch
from torch import nn

from gpu_engine.config import ModelConfig
from gpu_engine.model import CausalLM
from gpu_engine.quant import LinearMethod
from gpu_engine.roofline import decode_step_bytes, kv_bytes_per_token


def test_llama_8b_bf16_reads_15_gb_of_weights_and_one_embedding_row():
    cfg = ModelConfig.from_preset("llama-3.1-8b")
    with torch.device("meta"):
        model = CausalLM(cfg, LinearMethod(None, torch.bfloat16))
    kv = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 2)
    assert kv == 128 * 1024  # 128 KiB per position in BF16
    read = decode_step_bytes(model, 1, kv, 192)
    table = cfg.vocab_size * cfg.hidden_size * 2
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    assert read.weights == everything - table  # all but the embedding table
    assert read.embedding_rows == cfg.hidden_size * 2
    assert read.kv == 192 * kv
    assert read.weights / 1e9 == pytest.approx(15.01, abs=0.01)


class Packed(nn.Module):
    """A stand-in quantized linear: int8 storage with a scale, reporting its own stored size."""

    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(8, 4, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(8, dtype=torch.float16))

    def stored_bytes(self) -> int:
        return 8 * 4 + 8 * 2 + 100  # as if it also read a side table


def test_a_module_reports_its_stored_bytes_and_tied_weights_count_once():
    model = nn.Module()
    model.embed = nn.Embedding(10, 4)
    model.proj = Packed()
    model.head = nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight  # tied: the head reads the whole table
    model.norm = nn.Parameter(torch.ones(4))
    read = decode_step_bytes(model, 3, kv_bytes_per_token(1, 1, 4, 4), 2.5)
    assert read.weights == (8 * 4 + 8 * 2 + 100) + 10 * 4 * 4 + 4 * 4
    assert read.embedding_rows == 3 * 4 * 4
    assert read.kv == 3 * 2.5 * 32


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="batch >= 1"):
        decode_step_bytes(nn.Linear(2, 2), 0, 8, 1)


def test_llama_8b_fp8_linears_read_about_8_gb():
    """FP8 W8A8 linears store one byte per weight plus a float32 scale per output row; the
    lm_head (not quantized) and the norms stay BF16."""
    from gpu_engine.quant import linear_method
    from gpu_engine.quant.spec import online_fp8

    cfg = ModelConfig.from_preset("llama-3.1-8b")
    method = linear_method(online_fp8(), torch.bfloat16)
    with torch.device("meta"):
        model = CausalLM(cfg, method)
    read = decode_step_bytes(model, 1, kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 1), 192)
    assert read.weights / 1e9 == pytest.approx(8.0, abs=0.05)
