"""Fixtures: tiny random checkpoints (tests/tiny_models.py) and a random EAGLE-3 head for them."""

import pytest

from tests.tiny_models import tiny_checkpoints, tiny_llama  # noqa: F401


@pytest.fixture(scope="session")
def eagle_head(tiny_llama, tmp_path_factory):  # noqa: F811
    from tests.engine.spec_helpers import random_head

    return random_head(tiny_llama, tmp_path_factory.mktemp("eagle"))
