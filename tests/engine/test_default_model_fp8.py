"""The default model (SmolLM2-135M) quantized by llm-compressor (FP8_DYNAMIC) loads in taxiway; its
weights are exactly what our online FP8 makes (same logprobs), and its outputs are as close to
HF transformers + compressed-tensors on that checkpoint as FP8 rounding allows: on a 30-layer model
a last-bit difference between two float32 implementations flips some FP8 codes, so the two differ
by quantization noise (about 0.1 nats per token here), not exactly as on the tiny fixtures.

llm-compressor lives in its own venv (it pins its own transformers): the test runs
bench/llmc_fp8.py with the Python named by TAXIWAY_LLMC_PYTHON, and skips when that is unset."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from taxiway import LLM
from tests.engine.test_fp8_checkpoints import prompt_logprobs

REPO = Path(__file__).resolve().parent.parent.parent
PROMPTS = ["The capital of France is Paris, and the capital of Italy is", "def add(a, b):\n    return",
           "Once upon a time there was a little robot who"]


@pytest.fixture(scope="module")
def llmc_checkpoint(default_model_dir, tmp_path_factory) -> Path:
    python = os.environ.get("TAXIWAY_LLMC_PYTHON")
    if not python:
        pytest.skip("set TAXIWAY_LLMC_PYTHON to a Python with llmcompressor (its own venv) to run this")
    out = tmp_path_factory.mktemp("llmc") / "smol-fp8-dynamic"
    subprocess.run([python, str(REPO / "bench" / "llmc_fp8.py"), str(default_model_dir), str(out)],
                   check=True, capture_output=True, timeout=600)
    return out


def test_llm_compressor_fp8_dynamic_default_model(llmc_checkpoint, default_model_dir):
    pytest.importorskip("compressed_tensors")
    import transformers

    llm = LLM(str(llmc_checkpoint), device="cpu", max_model_len=512)
    assert llm.engine.quant_spec.source == "compressed-tensors"
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    ours = prompt_logprobs(llm, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llmc_checkpoint, dtype=torch.float32).eval()
    want = []
    with torch.no_grad():
        for p in ids:
            lps = torch.log_softmax(hf(torch.tensor([p])).logits[0].double(), -1)
            want += [float(lps[j - 1, p[j]]) for j in range(1, len(p))]
    want = torch.tensor(want, dtype=torch.float64)
    assert abs(float(ours.mean() - want.mean())) < 0.05 and float((ours - want).abs().mean()) < 0.2
    online = prompt_logprobs(LLM(str(default_model_dir), device="cpu", quantization="fp8", max_model_len=512), ids)
    assert (ours - online).abs().max() < 1e-6
