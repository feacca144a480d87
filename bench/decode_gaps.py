"""Where a decode step's GPU time goes between kernels: the engine's own loop (async scheduling, CUDA
graphs) at a benchmark's decode shape, --steps decode steps under torch.profiler. From the trace:
the device's busy time (the union of its kernels, copies and memsets) against the span from the
first to the last, the idle gaps between them (the longest, with what ran on either side, and the
idle time summed by that pair), beside the engine's own GPU time per step (its CUDA events).

A decode step's kernels added up to about 11% less than its GPU time (README: 51.4 against 57.7 ms
at 1,800 sequences, 24.8 against 28.0 at 331): this says whether that is idle device time, and
where it sits. Same decode-shape flags as bench/profile_decode.py:

    python bench/decode_gaps.py --seqs 1800 --ctx 190 --steps 8 --out gaps.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.profile_decode import decode_args, decoding_engine, group_of, running_context  # noqa: E402
from taxiway.benchmarks import machine_info  # noqa: E402

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
MIN_GAP_US = 1.0  # shorter gaps are the device's own launch latency inside a graph


def device_intervals(trace: dict) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every device operation in a Chrome trace, by start."""
    out = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), str(e.get("name", "?")))
           for e in trace.get("traceEvents", []) if e.get("cat") in DEVICE_CATEGORIES and "ts" in e]
    return sorted(out)


def gaps(intervals: list[tuple[float, float, str]], top: int = 12) -> dict:
    """Busy time (overlaps counted once), span, and the idle gaps between device operations."""
    if not intervals:
        return {"device_ops": 0, "span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "idle_share": 0.0,
                "gaps_over_1us": 0, "longest": [], "idle_by_pair": []}
    busy, idle, found = 0.0, 0.0, []
    cur_start, cur_end, cur_name = intervals[0]
    for start, end, name in intervals[1:]:
        if start > cur_end:  # the device sat idle from cur_end to start
            busy += cur_end - cur_start
            if start - cur_end >= MIN_GAP_US:
                idle += start - cur_end
                found.append((start - cur_end, cur_name, name))
            cur_start, cur_end, cur_name = start, end, name
        elif end > cur_end:
            cur_end, cur_name = end, name
    busy += cur_end - cur_start
    span = intervals[-1][1] - intervals[0][0]
    pairs: dict[tuple[str, str], list[float]] = {}
    for g, before, after in found:
        acc = pairs.setdefault((before[:60], after[:60]), [0.0, 0])
        acc[0] += g
        acc[1] += 1
    by_pair = sorted(pairs.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "device_ops": len(intervals), "span_ms": round(span / 1e3, 3), "busy_ms": round(busy / 1e3, 3),
        "idle_ms": round(idle / 1e3, 3), "idle_share": round(idle / span, 4) if span else 0.0,
        "gaps_over_1us": len(found),
        "longest": [{"gap_us": round(g, 1), "before": b[:90], "after": a[:90]}
                    for g, b, a in sorted(found, reverse=True)[:top]],
        "idle_by_pair": [{"before": b, "after": a, "idle_ms": round(v[0] / 1e3, 3), "gaps": v[1]}
                         for (b, a), v in by_pair],
    }


def group_ms_per_step(intervals: list[tuple[float, float, str]], steps: int) -> dict[str, float]:
    """Device time per step by kernel group (bench/profile_decode.py's groups), as the loop ran
    them: beside profile_decode's synchronous steps, whether a group is slower in the loop."""
    groups: dict[str, float] = {}
    for start, end, name in intervals:
        group = group_of(name)
        groups[group] = groups.get(group, 0.0) + (end - start)
    return {g: round(us / 1e3 / max(steps, 1), 3) for g, us in sorted(groups.items(), key=lambda kv: -kv[1])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    decode_args(ap, "decode steps profiled in the running loop")
    args = ap.parse_args(argv)
    engine = decoding_engine(args)
    cuda = engine.device.type == "cuda"
    context = running_context(engine)
    engine.async_scheduling = True
    for _ in range(2):  # the loop in flight again: a step launched while the last one runs
        engine.step()
    gpu_ms: list[float] = []
    collect = engine.runner.collect

    def timed_collect(flight):
        result = collect(flight)
        if engine.runner.last_gpu is not None:
            gpu_ms.append(round(engine.runner.last_gpu[0] * 1e3, 3))
        return result

    engine.runner.collect = timed_collect
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize()
    engine.runner.collect = collect
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    engine.abort_request(list(engine.requests))
    intervals = device_intervals(trace)
    found = gaps(intervals)
    found["group_ms_per_step"] = group_ms_per_step(intervals, args.steps)
    result = {"benchmark": "decode_gaps", "machine": machine_info(), "command": " ".join(sys.argv),
              "config": {k: v for k, v in vars(args).items() if k != "out"},
              "context": context,
              "engine_gpu_ms": gpu_ms, **found}
    print(f"{args.seqs} seqs x {args.ctx} ctx, {args.steps} steps in the loop: span {found['span_ms']} ms, "
          f"busy {found['busy_ms']} ms, idle {found['idle_ms']} ms ({100 * found['idle_share']:.1f}%) in "
          f"{found['gaps_over_1us']} gaps; engine GPU ms per step {gpu_ms}")
    print("  device ms per step by group: " + ", ".join(f"{g} {v}" for g, v in found["group_ms_per_step"].items()))
    for row in found["idle_by_pair"][:8]:
        print(f"  {row['idle_ms']:8.3f} ms in {row['gaps']:4d} gaps  {row['before'][:45]} -> {row['after'][:45]}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
