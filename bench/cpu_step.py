"""Host (CPU) time per decode step with N running sequences, without a GPU: the scheduler's plan,
the step's host arrays and sampling parameters, the commit and the update, with a stand-in for the
model. This is the work the overlapped loop must hide under the GPU's step time.

    python bench/cpu_step.py --seqs 256 --context 1024 --out bench/results/cpu-step.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_engine.block_manager import BlockManager  # noqa: E402
from gpu_engine.sampling_params import SamplingParams  # noqa: E402
from gpu_engine.scheduler import SampledToken, Scheduler, SchedulerConfig, StepResult  # noqa: E402
from gpu_engine.sequence import Request  # noqa: E402
from gpu_engine.step_inputs import InputBuilder, build_host_batch, padded_tables  # noqa: E402
from taxiway.benchmarks import machine_info  # noqa: E402

PARTS = ("schedule", "host_batch", "sampling", "commit_update")


def measure(num_seqs: int, context: int, steps: int) -> dict:
    bm = BlockManager(num_seqs * (context // 16 + 200), 16)
    sched = Scheduler(SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=1 << 20), bm)
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True, detokenize=False)
    for i in range(num_seqs):
        prompt = rng.integers(0, 100_000, context).tolist()
        sched.add(Request(f"r{i}", None, prompt, params, seed=i, eos_token_ids=frozenset({1}),
                          max_model_len=context + 100_000))
    builder = InputBuilder(torch.device("cpu"), 128_256)
    totals = dict.fromkeys(PARTS, 0.0)

    def step(record: bool) -> None:
        t0 = time.perf_counter()
        plan = sched.schedule()
        t1 = time.perf_counter()
        host = build_host_batch(plan, 16)
        padded_tables(host.block_tables)
        t2 = time.perf_counter()
        builder.sampling_batch(plan, host.sample_owner)
        t3 = time.perf_counter()
        sched.commit(plan)
        sched.update(plan, StepResult([[SampledToken(7)] if e.sample else [] for e in plan.scheduled]))
        t4 = time.perf_counter()
        if record:
            for name, dt in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                totals[name] += dt

    step(False)  # the prefill step
    for _ in range(5):
        step(False)
    for _ in range(steps):
        step(True)
    per = {k + "_ms": round(v / steps * 1e3, 3) for k, v in totals.items()}
    per["total_ms"] = round(sum(totals.values()) / steps * 1e3, 3)
    return {"seqs": num_seqs, "context": context, "steps": steps, **per}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = [measure(n, args.context, args.steps) for n in args.seqs]
    result = {"benchmark": "cpu_step", "machine": machine_info(), "command": " ".join(sys.argv), "rows": rows}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    for r in rows:
        print(f"{r['seqs']:5d} seqs  ctx {r['context']}: {r['total_ms']:.2f} ms/step  "
              + "  ".join(f"{k}={r[k + '_ms']:.2f}" for k in PARTS))


if __name__ == "__main__":
    main()
