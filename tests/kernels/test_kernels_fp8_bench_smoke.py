"""bench/fp8_gemm.py runs end to end on a tiny shape (CPU interpreter, or the GPU when present)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_fp8_gemm_benchmark_quick_run(run_quick_bench):
    data = run_quick_bench("fp8_gemm.py", "--sweep")
    rows = data["rows"]
    assert [r["M"] for r in rows] == [1, 4, 64]
    for r in rows:
        timed = {"bf16", "fp8_rowwise", "fp8_tensorwise", "fp8_linear", "fp8_small_m", "fp8_small_m_last_split"}
        timed |= {"fp8_gemv"} if r["M"] <= 4 else set()
        assert timed <= set(r)
        assert all(r[label]["ms"] > 0 and r[label]["copy_share"] > 0 for label in timed)
    assert {s["M"] for s in data["sweep"]} == {1, 16} and all(s["ms"] > 0 for s in data["sweep"])
