"""Shared fixtures. The default model is converted once per cache folder and shared by all tests.

Unless TAXIWAY_CACHE_DIR is set, tests use <repo>/.cache/taxiway (git-ignored): isolated from the
user's ~/.cache, kept between local runs, and fresh on a CI clone (one ~5 s conversion).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TAXIWAY_CACHE_DIR", str(REPO_ROOT / ".cache" / "taxiway"))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (config.json, model.safetensors, tokenizer.json...)."""
    from gpu_engine.default_model import default_model_path

    return default_model_path(progress=False)
