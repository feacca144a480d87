"""bench/kernels.py runs end to end on tiny shapes (CPU interpreter, or the GPU when present)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_kernel_benchmark_quick_run(tmp_path):
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/kernels.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert {r["name"].split()[0] for r in results} >= {
        "decode", "prefill", "rope+kv", "rms_norm", "fused_add_rms_norm", "silu_and_mul", "silu_and_mul_fp8"}
    assert all(r["t_ms"] > 0 and r["bytes"] > 0 for r in results)
