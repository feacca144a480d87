"""v_cache_token_major through the Triton kernels (the CPU interpreter here, the kernels on a GPU):
the engine's greedy tokens and prompt logprobs equal the row-major cache's (tests/engine/
test_v_cache_token_major.py: the same through the torch reference ops)."""

import pytest

pytest.importorskip("triton")

import gpu_engine.runner as runner_module  # noqa: E402
from gpu_engine.triton_ops import TritonOps  # noqa: E402
from tests.engine.test_v_cache_token_major import _close_logprobs, _run  # noqa: E402
from tests.tiny_models import tiny_checkpoints, tiny_llama  # noqa: E402,F401


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_same_outputs_through_the_kernels(tiny_llama, kv, device, monkeypatch):  # noqa: F811
    monkeypatch.setattr(runner_module, "select_ops", lambda dev: TritonOps())
    kw = dict(enforce_eager=True, device=device)
    row, tm = _run(tiny_llama, False, kv, **kw), _run(tiny_llama, True, kv, **kw)
    assert tm[0] == row[0] and tm[2] == row[2]
    # the same values through differently laid-out tiles: float32 on the CPU, the model's 16-bit
    # dtype on a GPU (its last bits may differ)
    _close_logprobs(tm[1], row[1], 1e-4 if device == "cpu" else 5e-2)
