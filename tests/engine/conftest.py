"""Fixtures: tiny random checkpoints (tests/tiny_models.py)."""

from tests.tiny_models import tiny_checkpoints, tiny_llama  # noqa: F401
