"""bench/fp8_gemm.py runs end to end on a tiny shape (CPU interpreter, or the GPU when present)."""

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
def test_fp8_gemm_benchmark_quick_run(tmp_path):
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = tmp_path / "fp8-gemm.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/fp8_gemm.py"), "--quick", "--sweep", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["M"] for r in rows] == [1, 4, 64]
    for r in rows:
        timed = {"bf16", "fp8_rowwise", "fp8_tensorwise", "fp8_linear", "fp8_small_m"}
        timed |= {"fp8_gemv"} if r["M"] <= 4 else set()
        assert timed <= set(r)
        assert all(r[label]["ms"] > 0 and r[label]["copy_share"] > 0 for label in timed)
    assert {s["M"] for s in data["sweep"]} == {1, 16} and all(s["ms"] > 0 for s in data["sweep"])
