"""bench/w4a16.py runs end to end on a tiny shape (CPU interpreter, or the GPU when present)."""

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
def test_w4a16_benchmark_quick_run(tmp_path):
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = tmp_path / "w4a16.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/w4a16.py"), "--quick", "--sweep", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["results"]
    assert {r["m"] for r in rows} == {1, 4, 64}
    for r in rows:
        assert any(label.startswith("default:") for label in r["paths"])
        assert all(p["t_ms"] > 0 and p["gbs"] > 0 for p in r["paths"].values())
        assert r["bf16"]["t_ms"] > 0 and r["best_path"] in r["paths"]
    assert data["sweep"] and all(s["t_ms"] > 0 for s in data["sweep"])
