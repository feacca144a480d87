"""Kernel tests: on a machine without CUDA, Triton kernels run in its CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection,
and only when no CUDA device is present. Tests marked `gpu` are skipped without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from kernels._triton_compat import patch_interpreter

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
