"""Make tests/data/tiny-llama-autoawq: a tiny random Llama quantized by AutoAWQ itself (GEMM, g 64).

AutoAWQ (deprecated, last tested with transformers 4.51) does not install beside the project's
transformers 5, so this runs in a separate venv, once, on the CPU (a few seconds):

    python3 -m venv /work/venvs/awq && /work/venvs/awq/bin/pip install torch==2.13.0 autoawq transformers==4.51.3
    /work/venvs/awq/bin/python tests/data/make_autoawq_fixture.py

Writes the checkpoint (config.json with AutoAWQ's quantization_config, model.safetensors with
qweight / qzeros / scales) and tiny-llama-autoawq.reference.safetensors beside it: AutoAWQ's own dequantized weight of every
linear (awq.utils.packing_utils.dequantize_gemm) and the logits of AutoAWQ's quantized model on
fixed token ids. tests/unit/test_int4_formats.py reads them; nothing here runs in the suite.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import awq.modules.linear.gemm as awq_gemm
from awq import AutoAWQForCausalLM
from awq.utils.packing_utils import dequantize_gemm
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = Path(__file__).resolve().parent / "tiny-llama-autoawq"
GROUP = 64
INPUT_IDS = [[1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 11, 200]]


def main() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="float16")
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(tmp)
        model = AutoAWQForCausalLM.from_pretrained(tmp, device_map="cpu")
        gen = torch.Generator().manual_seed(1)
        calib = [torch.randint(0, 256, (64,), generator=gen).tolist() for _ in range(16)]
        model.quantize(None, quant_config={"zero_point": True, "q_group_size": GROUP, "w_bit": 4,
                                           "version": "GEMM"},
                       calib_data=calib, max_calib_seq_len=64, n_parallel_calib_samples=None)
        if OUT.exists():
            shutil.rmtree(OUT)
        model.save_quantized(str(OUT), safetensors=True)
        ref = {}
        for name, mod in model.model.named_modules():
            if hasattr(mod, "qweight"):
                ref[f"{name}.dequantized"] = dequantize_gemm(mod.qweight, mod.qzeros, mod.scales, 4, GROUP).contiguous()
        awq_gemm.TRITON_AVAILABLE = False  # its Triton path needs CUDA; the CPU path is dequantize + matmul
        with torch.no_grad():
            ids = torch.tensor(INPUT_IDS)
            ref["input_ids"] = ids
            ref["logits"] = model.model(ids).logits.float().contiguous()
        save_file(ref, str(OUT.parent / "tiny-llama-autoawq.reference.safetensors"))
    for p in sorted(OUT.iterdir()):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
