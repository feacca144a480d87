"""bench/decode_gaps.py (idle device time between a decode step's kernels, issue 14): the gap
arithmetic on a made-up trace, and the script end to end on a tiny model on the CPU (no device
operations there: zero busy time, the steps still run in the loop)."""

import json

from bench.decode_gaps import device_intervals, gaps, group_ms_per_step, main


def test_gaps_count_overlaps_once_and_name_both_sides():
    trace = {"traceEvents": [
        {"cat": "kernel", "name": "a", "ts": 0, "dur": 10},
        {"cat": "kernel", "name": "b", "ts": 5, "dur": 10},  # overlaps a: busy 0-15
        {"cat": "gpu_memcpy", "name": "copy", "ts": 15.5, "dur": 2},  # a 0.5 us gap: launch latency, not counted
        {"cat": "kernel", "name": "c", "ts": 40, "dur": 10},  # 22.5 us idle after the copy
        {"cat": "cpu_op", "name": "aten::mm", "ts": 20, "dur": 100},  # host side: ignored
        {"cat": "kernel", "name": "c", "ts": 60, "dur": 5},  # 10 us after c
    ]}
    found = gaps(device_intervals(trace))
    assert found["device_ops"] == 5 and found["span_ms"] == 0.065
    assert found["busy_ms"] == round((15 + 2 + 10 + 5) / 1e3, 3)
    assert found["idle_ms"] == round(32.5 / 1e3, 3) and found["gaps_over_1us"] == 2
    assert found["longest"][0] == {"gap_us": 22.5, "before": "copy", "after": "c"}
    assert [(r["before"], r["after"], r["gaps"]) for r in found["idle_by_pair"]] == [("copy", "c", 1), ("c", "c", 1)]


def test_device_time_per_step_by_group():
    intervals = [(0.0, 300.0, "nvjet_sm90_tst_128x232"), (300.0, 400.0, "decode_split_kernel"),
                 (400.0, 1000.0, "nvjet_sm90_tst_256x120"), (1000.0, 1010.0, "Memset (Device)")]
    assert group_ms_per_step(intervals, steps=2) == {"gemm": 0.45, "attention": 0.05, "copy": 0.005}
    assert list(group_ms_per_step(intervals, steps=2)) == ["gemm", "attention", "copy"]  # largest first
    assert group_ms_per_step([], steps=3) == {}


def test_runs_in_the_loop_on_the_cpu(tiny_llama, tmp_path):
    out = tmp_path / "gaps.json"
    assert main(["--model", tiny_llama, "--device", "cpu", "--seqs", "3", "--ctx", "40", "--steps", "3",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "decode_gaps" and r["config"]["seqs"] == 3 and r["context"]["min"] >= 41
    assert r["device_ops"] == 0 and r["busy_ms"] == 0.0 and r["engine_gpu_ms"] == []
    assert r["group_ms_per_step"] == {}
