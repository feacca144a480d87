"""Every kernel compiles for sm_90 (H100/H200) through Triton's own ptxas, without a GPU, and
keeps its registers: no spills to local memory (bf16/fp16; float32 attention, a test-only path,
may spill), the prefill, W4A16 mm and FP8 small-M kernels on Hopper's wgmma, and an FP8 cache's
token-major V read without byte-wide shared loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/compile_report.py"), "--out", str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(report.read_text())
    kernels = {r["kernel"] for r in rows}
    assert {"decode_split_kernel", "decode_combine_kernel", "prefill_kernel",
            "_rope_write_kv_kernel", "_rms_norm_kernel", "_fused_add_rms_norm_kernel",
            "_silu_and_mul_kernel", "_gemv_kernel", "_mm_kernel", "_split_k_reduce_kernel",
            "_dequant_kernel", "_fp8_mma_kernel", "_fp8_gemv_kernel"} <= kernels
    assert {"stats_kernel", "pivot_kernel", "gather_kernel", "finalize_kernel", "probs_kernel"} <= kernels
    for r in rows:  # float32 attention (tests only) runs an exact FMA dot and may spill
        attention = r["case"].startswith(("decode", "prefill"))
        if not (attention and r["dtype"] == "float32"):
            assert r["local_bytes"] == 0 and r["stack_bytes"] == 0, f"spills: {r}"
    assert all(r["wgmma"] > 0 for r in rows
               if r["kernel"] in ("prefill_kernel", "_mm_kernel") and r["dtype"] != "float32")
    assert all(r["wgmma"] > 0 for r in rows if r["kernel"] == "_fp8_mma_kernel"), "FP8 wgmma"
    assert all(r["ld_v4"] > 0 for r in rows if r["kernel"] in ("_gemv_kernel", "_fp8_gemv_kernel")), \
        "16-byte weight loads"
    assert not any(r["pair_asm_mismatches"] for r in rows), "a bf16x2 / f16x2 pair from two words"
    token_major = [r for r in rows if r["case"] == "decode fp8 kv token-major V" and r["kernel"] == "decode_split_kernel"]
    assert token_major and not any(r["ld_shared_b8"] for r in token_major), \
        "a token-major FP8 V reaches the dot without byte-wide shared loads"
