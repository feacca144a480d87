"""Test doubles shared by the suites: request factories and a fake model runner (no torch)."""

from __future__ import annotations

from gpu_engine.scheduler import PENDING, SampledToken, Scheduler, StepPlan, StepResult
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
    """Deterministic "model": the next token depends only on the tokens a step consumed and the
    sample index, so recomputation after preemption must reproduce it exactly. Like the real
    runner it is launched (before the scheduler commits the plan) and collected later."""

    def __init__(self):
        self.plans: list[StepPlan] = []

    def launch(self, plan: StepPlan) -> StepPlan:
        self.plans.append(plan)
        return plan

    def collect(self, plan: StepPlan) -> StepResult:
        samples = []
        for entry in plan.scheduled:
            if not entry.sample:
                samples.append([])
                continue
            if entry.is_verify:
                samples.append(self._verify(entry))
                continue
            consumed = entry.seq.token_ids[: entry.start + entry.num_tokens]
            assert PENDING not in consumed, "a step read a token that was never filled in"
            samples.append([SampledToken(fake_next_token(consumed, entry.seq.index, k))
                            for k in range(entry.num_samples)])
        return StepResult(samples)

    @staticmethod
    def _verify(entry) -> list[SampledToken]:
        """Greedy verification against the fake model: drafts are accepted while they equal its
        next token; then its own token (the correction, or the bonus after k accepted)."""
        tokens = list(entry.seq.token_ids[: entry.start + 1])
        assert PENDING not in tokens, "a verify entry read a token that was never filled in"
        out = []
        for draft in [*entry.draft_token_ids, None]:
            token = fake_next_token(tokens, entry.seq.index)
            out.append(SampledToken(token))
            if token != draft:
                break
            tokens.append(token)
        return out


def fake_next_token(consumed: list[int], sample_index: int, k: int = 0) -> int:
    """FakeRunner's token after `consumed` (the k-th sample of a forking prompt)."""
    base = sum((i + 1) * t for i, t in enumerate(consumed)) + sample_index
    return (base + 7 * k) % (VOCAB - 1)


def run_step(scheduler: Scheduler, runner: FakeRunner) -> StepPlan:
    """One synchronous step: schedule, launch, commit, collect, update."""
    plan = scheduler.schedule()
    runner.launch(plan)
    scheduler.commit(plan)
    scheduler.update(plan, runner.collect(plan))
    return plan


def run_to_completion(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 1000,
                      overlap: bool = False) -> int:
    """Step until nothing is left, checking the block pool after every step; returns the step
    count. With overlap, step N+1 is planned and launched before step N is collected."""
    steps = 0
    inflight = None
    while scheduler.num_unfinished or inflight is not None:
        plan = scheduler.schedule()
        launched = None
        if not plan.is_empty:
            launched = runner.launch(plan)
            scheduler.commit(plan)
        else:
            assert inflight is not None, "scheduler stalled with work left"
        if not overlap and launched is not None:
            scheduler.update(launched, runner.collect(launched))
            launched = None
        if inflight is not None:
            scheduler.update(inflight, runner.collect(inflight))
        inflight = launched
        scheduler.block_manager.check_integrity()
        steps += 1
        assert steps < max_steps
    return steps
