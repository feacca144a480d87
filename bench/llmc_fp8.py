"""Quantize a checkpoint with llm-compressor (FP8_DYNAMIC, or FP8 static with calibration), for
comparing its checkpoints with ours. Run it with a Python that has llmcompressor, in its own venv:

    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
    /tmp/llmc/bin/python bench/llmc_fp8.py SRC OUT [FP8_DYNAMIC]

(the default model, SmolLM2-135M, takes about 10 s on a CPU). tests/engine/test_default_model_fp8.py
runs it when TAXIWAY_LLMC_PYTHON names such a Python; bench/quality.py evaluates its output.
"""

import os
import sys
import time

# bench/kernels.py would shadow the `kernels` package that transformers imports.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.quantization import QuantizationModifier  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main() -> int:
    src, out = sys.argv[1], sys.argv[2]
    scheme = sys.argv[3] if len(sys.argv) > 3 else "FP8_DYNAMIC"
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    print(f"llm-compressor {scheme}: {out} in {time.time() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
