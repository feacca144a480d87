"""Check that AutoAWQ itself loads a checkpoint written by `quantize_awq(out_format="autoawq")`.

Runs in the AutoAWQ venv (see make_autoawq_fixture.py), not in the suite:

    /work/venvs/awq/bin/python tests/data/check_autoawq_loads.py OUT_DIR LOGITS.safetensors

Loads OUT_DIR with AutoAWQForCausalLM.from_quantized on the CPU (its dequantize + matmul path),
runs fixed token ids and writes AutoAWQ's logits; compare_autoawq_logits() in the main venv
compares them with ours.
"""

from __future__ import annotations

import sys

import awq.models.base as awq_base
import awq.modules.linear.gemm as awq_gemm
import torch
from awq import AutoAWQForCausalLM
from safetensors.torch import save_file

IDS = [[1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 11, 200]]


def main(folder: str, out: str) -> None:
    awq_gemm.TRITON_AVAILABLE = False  # its Triton path needs CUDA
    # On a CPU from_quantized insists on intel_extension_for_pytorch's kernels; keep its plain
    # WQLinear_GEMM layers (dequantize + matmul) instead.
    awq_base.get_best_device = lambda: "cuda:0"
    model = AutoAWQForCausalLM.from_quantized(folder, fuse_layers=False, device_map={"": "cpu"})
    with torch.no_grad():
        ids = torch.tensor(IDS)
        logits = model.model(ids).logits.float().contiguous()
    save_file({"input_ids": ids, "logits": logits}, out)
    print("AutoAWQ loaded", folder, "logits", tuple(logits.shape))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
