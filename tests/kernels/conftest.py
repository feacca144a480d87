"""Kernel tests: on a machine without CUDA, Triton kernels run in its CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection,
and only when no CUDA device is present. Tests marked `gpu` are skipped without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from taxiway_kernels._triton_compat import patch_interpreter

        patch_interpreter()
    except ImportError:  # no triton: each test module skips itself
        pass


@pytest.fixture(autouse=True)
def _skip_gpu_tests_without_cuda(request):
    if request.node.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def run_quick_bench(tmp_path):
    """run(script, *args) -> the JSON that bench/<script> --quick --out writes (CPU interpreter without CUDA)."""

    def run(script: str, *args: str) -> dict:
        env = dict(os.environ)
        if not torch.cuda.is_available():
            env["TRITON_INTERPRET"] = "1"
        out = tmp_path / "bench.json"
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", *args, "--out", str(out)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(out.read_text())

    return run
