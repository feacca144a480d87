"""Fault injection for the fault suite (tests/integration/test_faults_*.py): off unless an executor
is started with `fault_step_errors` (ExecutorConfig), e.g. `--fault-step-errors 3-5`.

    engine = StepFaults(engine, parse_steps("3-5"))   # its steps 3, 4 and 5 raise InjectedFault
    engine.arm()                                       # (a test in the same process) and the next

A real LLMEngine fails inside the step, after the plan took its KV blocks and was launched, where
a sampler error would (its runner's collect raises); another engine (the fake) runs its step and
then raises, so the step's outputs are lost. Every other attribute is the engine's own.
"""

from __future__ import annotations


class InjectedFault(RuntimeError):
    """The error an injected fault raises."""


def parse_steps(spec: str) -> frozenset[int]:
    """'3' -> {3}; '3,7' -> {3, 7}; '3-5' -> {3, 4, 5} (engine steps, counted from 1)."""
    steps: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        first, _, last = part.partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"fault_step_errors: {part!r} is not a step number or a range "
                             "like 3-5") from None
        if not 1 <= lo <= hi:
            raise ValueError(f"fault_step_errors: {part!r} must be steps >= 1, low to high")
        steps.update(range(lo, hi + 1))
    return frozenset(steps)


class StepFaults:
    def __init__(self, engine, steps: frozenset[int] = frozenset()):
        self._engine = engine
        self._steps = set(steps)
        self.count = 0
        """Steps run so far."""

    def arm(self, steps: int = 1) -> None:
        """The next `steps` steps raise (from another thread: the step loop picks it up)."""
        self._steps.update(range(self.count + 1, self.count + 1 + steps))

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def step(self):
        self.count += 1
        if self.count not in self._steps:
            return self._engine.step()
        message = f"injected fault in engine step {self.count}"
        runner = getattr(self._engine, "runner", None)
        if runner is None:
            self._engine.step()
            raise InjectedFault(message)

        def fail(flight):
            raise InjectedFault(message)

        runner.collect = fail  # an instance attribute shadows the method for this one step
        try:
            return self._engine.step()
        finally:
            del runner.collect
