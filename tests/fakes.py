"""Test doubles shared by the suites: request factories and a fake model runner (no torch)."""

from __future__ import annotations

from gpu_engine.scheduler import SampledToken, Scheduler, StepPlan, StepResult
from gpu_engine.sequence import Request
from gpu_engine.sampling_params import SamplingParams

VOCAB = 50
EOS = 49


def make_request(
    rid: str, prompt: list[int], max_model_len: int = 256, priority: int = 0, **params
) -> Request:
    params.setdefault("max_tokens", 4)
    params.setdefault("ignore_eos", True)
    return Request(
        request_id=rid, prompt=None, prompt_token_ids=list(prompt), params=SamplingParams(**params),
        seed=1234, eos_token_ids=frozenset({EOS}), max_model_len=max_model_len, priority=priority,
    )


class FakeRunner:
    """Deterministic "model": the next token depends only on the sequence's tokens so far and the
    sample index, so recomputation after preemption must reproduce it exactly."""

    def __init__(self):
        self.plans: list[StepPlan] = []

    def execute(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        samples = []
        for entry in plan.scheduled:
            if not entry.sample:
                samples.append([])
                continue
            base = sum((i + 1) * t for i, t in enumerate(entry.seq.token_ids)) + entry.seq.index
            samples.append([SampledToken((base + 7 * k) % (VOCAB - 1)) for k in range(entry.num_samples)])
        return StepResult(samples)


def run_to_completion(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 1000) -> int:
    """Step until nothing is left, checking the block pool after every step; returns the step count."""
    steps = 0
    while scheduler.num_unfinished:
        plan = scheduler.schedule()
        assert not plan.is_empty, "scheduler stalled with work left"
        scheduler.update(plan, runner.execute(plan))
        scheduler.block_manager.check_integrity()
        steps += 1
        assert steps < max_steps
    return steps
