"""Batch defaults by device, the CUDA-graph ladder, and the step timings' summary."""

import pytest

from gpu_engine.config import EngineConfig, batch_limits
from gpu_engine.cuda_graphs import batch_size_ladder
from gpu_engine.step_times import StepTimes

GIB = 2**30


@pytest.mark.parametrize("memory, want", [(None, (256, 8192)), (24 * GIB, (256, 8192)),
                                          (80 * GIB, (1024, 8192)), (141 * GIB, (1024, 8192))])
def test_defaults_serve_a_big_gpu_with_a_larger_batch(memory, want):
    assert batch_limits(EngineConfig(), memory) == want


@pytest.mark.parametrize("memory, name, want", [(None, "", 8192), (24 * GIB, "NVIDIA L4", 8192),
                                                (80 * GIB, "NVIDIA A100-SXM4-80GB", 8192),
                                                (80 * GIB, "NVIDIA H100 80GB HBM3", 16384),
                                                (141 * GIB, "NVIDIA H200", 16384)])
def test_the_offline_llm_class_takes_a_larger_token_budget_on_a_big_gpu(memory, name, want):
    assert batch_limits(EngineConfig(), memory, name, offline=True)[1] == want
    assert batch_limits(EngineConfig(), memory, name)[1] == 8192  # the engine the services wrap
    assert batch_limits(EngineConfig(max_num_batched_tokens=4096), memory, name, offline=True)[1] == 4096


def test_given_limits_win_over_the_defaults():
    assert batch_limits(EngineConfig(max_num_seqs=4096, max_num_batched_tokens=16384), 141 * GIB) == (4096, 16384)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_limits_are_refused_with_the_value(bad):
    with pytest.raises(ValueError, match="max_num_seqs must be a positive integer"):
        EngineConfig(max_num_seqs=bad)


def test_graph_ladder_reaches_4096_with_little_padding():
    ladder = batch_size_ladder(4096)
    assert ladder[:4] == [1, 2, 4, 8] and ladder[-1] == 4096
    for lo, hi in zip(ladder, ladder[1:]):
        if lo >= 1024:
            assert (hi - lo) / hi <= 0.0625  # a batch pads by at most ~6% here
        elif lo >= 256:
            assert (hi - lo) / hi <= 0.112
    assert batch_size_ladder(300)[-1] == 300 and max(batch_size_ladder(10_000)) == 4096


def test_step_times_summary_gives_means_and_host_time_without_the_wait():
    t = StepTimes()
    t.add("decode", 100, 100, step=0.010, schedule=0.001, prepare=0.002, wait=0.005, output=0.001)
    t.add("decode", 300, 300, step=0.020, schedule=0.003, prepare=0.002, wait=0.011, output=0.001)
    t.add_gpu("decode", 0.012, 0.0)
    t.add_gpu("decode", 0.014, 0.001)
    s = t.summary()["decode"]
    assert s["steps"] == 2 and s["mean_seqs"] == 200
    assert s["host_ms"] == pytest.approx(5.0) and s["wait_ms"] == pytest.approx(8.0)
    assert s["step_ms"] == pytest.approx(15.0) and s["gpu_ms"] == pytest.approx(13.0)
    assert s["gpu_idle_ms"] == pytest.approx(0.5) and s["share_idle_over_50us"] == 0.5
