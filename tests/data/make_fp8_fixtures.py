"""Writes the FP8 fixtures under tests/data with llm-compressor (run once, in its own venv):

    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
    /tmp/llmc/bin/python tests/data/make_fp8_fixtures.py

A tiny random Llama (2 layers, hidden 64) whose fused parts have very different magnitudes
(k_proj 8x q_proj, v_proj 0.1x; up_proj 5x gate_proj), quantized two ways:
  tiny-llama-fp8-dynamic: FP8_DYNAMIC (per-channel weights, dynamic per-token activations)
  tiny-llama-fp8-static:  FP8 (per-tensor weights, static per-tensor activations) + FP8 KV-cache scales
Beside each folder, NAME.reference.safetensors: llm-compressor's own logits (its fake-quantized
forward, after oneshot) for the prompts in `prompt_ids`, which tests compare taxiway against.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=320, max_position_embeddings=512, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)
KV_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def tiny_model(folder: Path) -> LlamaForCausalLM:
    """Made, saved to `folder` (llm-compressor wants a model with a name_or_path) and loaded back."""
    torch.manual_seed(1234)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    gains = {"k_proj": 8.0, "v_proj": 0.1, "up_proj": 5.0}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
                for part, gain in gains.items():
                    if f".{part}." in name:
                        p.mul_(gain)
    model.save_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """t0 .. t319, one word per id (llm-compressor wants a processor beside a calibration set)."""
    vocab = {f"t{i}": i for i in range(TINY["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1",
                                   eos_token="t2")


def prompts() -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (3, 24), generator=torch.Generator().manual_seed(7))


def calibration() -> Dataset:
    ids = torch.randint(3, TINY["vocab_size"], (32, 64), generator=torch.Generator().manual_seed(8))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def make(name: str, recipe: QuantizationModifier, calibrate: bool) -> None:
    out = HERE / name
    shutil.rmtree(out, ignore_errors=True)
    model = tiny_model(Path(tempfile.mkdtemp()))
    tokenizer = word_tokenizer()
    kwargs = dict(dataset=calibration(), num_calibration_samples=32, max_seq_length=64,
                  processor=tokenizer) if calibrate else {}
    oneshot(model=model, recipe=recipe, **kwargs)
    ids = prompts()
    with torch.no_grad():
        logits = model(ids).logits.float()  # llm-compressor's fake-quantized forward
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    save_file({"prompt_ids": ids.contiguous(), "logits": logits.contiguous()}, str(HERE / f"{name}.reference.safetensors"))
    (out / "recipe.yaml").unlink(missing_ok=True)
    print(name, sorted(p.name for p in out.iterdir()))


def main() -> int:
    make("tiny-llama-fp8-dynamic",
         QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]), calibrate=False)
    make("tiny-llama-fp8-static",
         QuantizationModifier(targets="Linear", scheme="FP8", ignore=["lm_head"], kv_cache_scheme=KV_SCHEME),
         calibrate=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
