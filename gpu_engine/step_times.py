"""Where the steps' time goes, host and GPU, split by decode-only and mixed steps.

Host parts of one `LLMEngine.step()` (seconds, summed per kind):
  schedule  planning and commit (scheduler.schedule, scheduler.commit)
  prepare   the persistent batch's updates and the step's host arrays (runner)
  forward   uploads and the forward's launch (a graph replay, or every eager kernel launch)
  sample    sampling and logprob launches, the tokens' copy back
  wait      waiting for the device (not host work)
  collect   reading the tokens back into a result
  update    scheduler.update: tokens filled in, stops, blocks registered
  output    detokenization and RequestOutputs
  propose   speculative drafts for the next step (speculative decoding only)
`host` is their sum without `wait`; `step` is the wall time of step() (with async scheduling a
step's host parts belong to two device steps: it launches one and collects the previous one).
On a GPU, each collected step also reports `gpu` (device time between the step's first and last
enqueued work, CUDA events) and `gpu_idle` (how long the device sat idle before the step began:
0 when the host had it queued in time).
"""

from __future__ import annotations

HOST_PARTS = ("schedule", "prepare", "forward", "sample", "collect", "update", "output", "propose")


class StepTimes:
    """Summed seconds per step kind ("decode", "mixed", "verify"); summary() gives means in milliseconds."""

    def __init__(self):
        self.totals: dict[str, dict[str, float]] = {}

    def add(self, kind: str, num_seqs: int, num_tokens: int, step: float, **parts: float) -> None:
        acc = self.totals.setdefault(kind, {"steps": 0, "seqs": 0, "tokens": 0})
        acc["steps"] += 1
        acc["seqs"] += num_seqs
        acc["tokens"] += num_tokens
        acc["step"] = acc.get("step", 0.0) + step
        acc["host"] = acc.get("host", 0.0) + sum(v for k, v in parts.items() if k in HOST_PARTS)
        for name, value in parts.items():
            acc[name] = acc.get(name, 0.0) + value

    def add_gpu(self, kind: str, gpu: float, idle: float | None) -> None:
        """Device time of one collected step of `kind` (and the idle gap before it, if known)."""
        acc = self.totals.setdefault(kind, {"steps": 0, "seqs": 0, "tokens": 0})
        acc["gpu_steps"] = acc.get("gpu_steps", 0) + 1
        acc["gpu"] = acc.get("gpu", 0.0) + gpu
        if idle is not None:
            acc["idle_steps"] = acc.get("idle_steps", 0) + 1
            acc["gpu_idle"] = acc.get("gpu_idle", 0.0) + idle
            acc["idle_over_50us"] = acc.get("idle_over_50us", 0) + (idle > 50e-6)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per kind: steps, mean sequences and tokens per step, mean ms of each part, host_ms, step_ms,
        and (GPU) gpu_ms, gpu_idle_ms and the share of steps whose device idled over 50 us first."""
        out = {}
        for kind, acc in self.totals.items():
            n = max(acc["steps"], 1)
            row = {"steps": acc["steps"], "mean_seqs": round(acc["seqs"] / n, 1),
                   "mean_tokens": round(acc["tokens"] / n, 1)}
            for k, v in acc.items():
                if k in ("steps", "seqs", "tokens", "gpu_steps", "gpu", "idle_steps", "gpu_idle", "idle_over_50us"):
                    continue
                row[k + "_ms"] = round(v / n * 1e3, 3)
            if acc.get("gpu_steps"):
                row["gpu_ms"] = round(acc["gpu"] / acc["gpu_steps"] * 1e3, 3)
            if acc.get("idle_steps"):
                row["gpu_idle_ms"] = round(acc["gpu_idle"] / acc["idle_steps"] * 1e3, 3)
                row["share_idle_over_50us"] = round(acc["idle_over_50us"] / acc["idle_steps"], 3)
            out[kind] = row
        return out

    def reset(self) -> None:
        self.totals.clear()


def step_kind(plan) -> str:
    """"verify" (speculative drafts checked), "decode" (one token per sequence) or "mixed"."""
    if any(e.is_verify for e in plan.entries):
        return "verify"
    return "decode" if plan.num_decodes == plan.num_plain_decodes + len(plan.entries) else "mixed"
