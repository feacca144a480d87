"""Where a step's time goes: torch.profiler over one prefill step (8192 tokens) and one decode
step (256 sequences, graph replay and eager), Llama-3.1-8B dummy weights; then mixed steps
(1024 decodes + prefill chunks up to 8192 tokens) launched on an idle GPU, so that the launch's
host time is measured alone (no back-pressure from a queue full of the previous step's kernels),
beside the step's GPU time and its count of kernel launches; last, one mixed step's kernels by
group. --quantization / --kv-cache-dtype take the engine's settings (T2: fp8 and fp8).

    python bench/profile_step.py --out profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_engine.engine import LLMEngine  # noqa: E402
from gpu_engine.sampling_params import SamplingParams  # noqa: E402
from taxiway.benchmarks import machine_info, random_prompts  # noqa: E402


def top_kernels(prof, n: int | None = 15) -> list[dict]:
    """The device kernels taking the most time (all of them with n None), longest first."""
    rows = []
    for e in prof.key_averages():
        cuda_us = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
        if cuda_us > 0 and e.key and not e.key.startswith(("ProfilerStep", "aten::", "cuda")):
            rows.append({"kernel": e.key[:90], "calls": e.count, "total_ms": round(cuda_us / 1e3, 3)})
    rows.sort(key=lambda r: -r["total_ms"])
    return rows[:n]


def timed_step(engine: LLMEngine) -> tuple[float, list]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3, outs


def profiled(engine: LLMEngine, label: str, results: dict) -> None:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ms, _ = timed_step(engine)
    kernels = top_kernels(prof)
    results[label] = {"step_ms": round(ms, 3), "gpu_ms_total": round(sum(k["total_ms"] for k in top_kernels(prof, None)), 3),
                      "top": kernels}
    print(f"\n== {label}: step {ms:.2f} ms")
    for k in kernels:
        print(f"{k['total_ms']:9.3f} ms {k['calls']:6d}x  {k['kernel']}")


def launch_counts(prof) -> dict:
    """Host-side launch calls in a profile: count and total CPU ms per API."""
    out = {}
    for e in prof.key_averages():
        if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel", "cudaMemcpyAsync",
                     "cudaLaunchKernelExC", "cudaGraphLaunch"):
            out[e.key] = {"calls": e.count, "cpu_ms": round(e.cpu_time_total / 1e3, 3)}
    return out


def idle_launch(engine: LLMEngine) -> dict:
    """One synchronous step taken apart: launch on an idle GPU (host time alone), then its GPU time."""
    sched, runner = engine.scheduler, engine.runner
    plan = sched.schedule()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        flight = runner.launch(plan)
        launch_ms = (time.perf_counter() - t0) * 1e3
    sched.commit(plan)
    result = runner.collect(flight)
    gpu_s = runner.last_gpu[0] if runner.last_gpu else float("nan")  # None off a GPU
    sched.update(plan, result)
    return {"seqs": plan.num_plain_decodes + len(plan.entries), "tokens": plan.num_tokens,
            "launch_ms_gpu_idle": round(launch_ms, 3), "parts_ms": {k: round(v * 1e3, 3) for k, v in runner.last_parts.items()},
            "gpu_ms": round(gpu_s * 1e3, 3), "launches": launch_counts(prof)}


def mixed_kernels(engine: LLMEngine) -> dict:
    """One synchronous mixed step (decodes + prefill chunks) under the profiler: its kernels,
    grouped as bench/profile_decode.py groups them."""
    from bench.profile_decode import kernel_times  # that module imports this one

    sched = engine.scheduler
    seqs, backlog = len(sched.running), sched.prefill_backlog_tokens()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ms, _ = timed_step(engine)
    kernels = kernel_times(prof)
    groups: dict[str, float] = {}
    for k in kernels:
        groups[k["group"]] = round(groups.get(k["group"], 0.0) + k["total_ms"], 3)
    out = {"running_before": seqs, "prefill_backlog_before": backlog, "step_ms": round(ms, 3),
           "kernel_ms": round(sum(k["total_ms"] for k in kernels), 3),
           "groups_ms": dict(sorted(groups.items(), key=lambda g: -g[1])), "top": kernels[:20]}
    print(f"\n== mixed step ({seqs} running, {backlog} prompt tokens waiting): step {ms:.2f} ms, "
          f"kernels {out['kernel_ms']:.2f} ms: {out['groups_ms']}")
    return out


def mixed_steps(engine: LLMEngine, vocab: int, results: dict) -> None:
    """1024 running decodes, then prompts arriving so that steps carry prefill chunks."""
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, detokenize=False)
    for i, p in enumerate(random_prompts(1024, 128, vocab, 6)):
        engine.add_request(f"m{i}", p, params)
    while engine.scheduler.prefill_backlog_tokens() > 0:
        engine.step()
    overlap, engine.async_scheduling = engine.async_scheduling, False
    engine.step()  # collects the step in flight: the scheduler is now in step with the device
    rows = [idle_launch(engine) for _ in range(3)]  # decode-only, graphs
    for i, p in enumerate(random_prompts(64, 1024, vocab, 7)):
        engine.add_request(f"n{i}", p, params)
    rows += [idle_launch(engine) for _ in range(4)]  # mixed: decodes + 7168-token prefill chunks
    results["idle_launches"] = rows
    for i, p in enumerate(random_prompts(64, 1024, vocab, 8)):
        engine.add_request(f"k{i}", p, params)
    results["mixed_kernels"] = mixed_kernels(engine)
    for r in rows:
        print(f"{r['seqs']:5d} seqs {r['tokens']:5d} tokens: launch {r['launch_ms_gpu_idle']:.2f} ms host "
              f"(GPU idle), GPU {r['gpu_ms']:.2f} ms, {r['launches']}")
    engine.async_scheduling = overlap
    engine.abort_request(list(engine.requests))
    while engine.has_unfinished_requests():
        engine.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    engine = LLMEngine(model=args.model, load_format="dummy", max_model_len=2048, max_num_seqs=1088,
                       enable_prefix_caching=False, quantization=args.quantization,
                       kv_cache_dtype=args.kv_cache_dtype)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True, detokenize=False)
    results: dict = {"benchmark": "profile_step", "machine": machine_info(), "command": " ".join(sys.argv),
                     "config": {k: v for k, v in vars(args).items() if k != "out"}}
    for i, p in enumerate(random_prompts(64, 128, vocab, 5)):
        engine.add_request(f"w{i}", p, params)
    while engine.has_unfinished_requests():  # warm-up: compile every kernel variant
        engine.step()
    for i, p in enumerate(random_prompts(64, 128, vocab, 1)):
        engine.add_request(f"p{i}", p, params)
    profiled(engine, "prefill_64x128", results)
    for i, p in enumerate(random_prompts(192, 128, vocab, 2)):
        engine.add_request(f"q{i}", p, params)
    while engine.scheduler.prefill_backlog_tokens() > 0:
        engine.step()
    for _ in range(3):
        engine.step()
    profiled(engine, "decode_256_graph", results)
    graphs, engine.runner.graphs = engine.runner.graphs, None
    engine.step()
    profiled(engine, "decode_256_eager", results)
    engine.runner.graphs = graphs
    times = [timed_step(engine)[0] for _ in range(10)]
    results["decode_256_graph_step_ms"] = sorted(times)[5]
    engine.abort_request(list(engine.requests))
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request("one", random_prompts(1, 128, vocab, 3)[0], params)
    for _ in range(5):
        engine.step()
    profiled(engine, "decode_1_graph", results)
    times = [timed_step(engine)[0] for _ in range(20)]
    results["decode_1_step_ms"] = sorted(times)[10]
    engine.abort_request(list(engine.requests))
    while engine.has_unfinished_requests():
        engine.step()
    mixed_steps(engine, vocab, results)
    text = json.dumps(results, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
