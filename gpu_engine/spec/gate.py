"""When speculating pays, measured: SpecGate compares, per batch size, how many tokens per second
the engine emits in steps that speculate against steps that do not, and speculates only where that
is faster.

Whether a draft pays depends on what no configuration knows: how often the target accepts it (a
repeating prompt, a chat question, a trained or an untrained head), what a draft costs against a
verify step on this card, and what the synchronous loop that speculation needs costs against the
overlapped one. So the gate measures it. Steps are grouped into buckets by running sequences (1,
2-3, 4-7, ...). Per bucket it keeps a moving rate (output tokens over step wall time, the last
`window` steps weighing most) for each mode; it runs the faster one and, for a bounded share of
the time, probes the other afresh for `probe_steps` steps, ending a probe after two when the probed
mode runs at less than half the chosen one's rate (a probe that confirms the choice doubles the
wait before the next). A bucket starts by speculating (what the user asked for) for `probe_steps`
steps, then measures the plain loop, so a draft that only costs is off after about ten steps. Only steps without prefill chunks are counted (a prefill step's time says nothing about
decoding), and the first step after a change of mode is skipped (it drains the other mode's
pipeline).

Which steps speculate never changes a greedy output, nor a sampled one with point-mass drafts
(n-gram, greedy drafters): see gpu_engine/spec/rejection.py. No torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

@dataclass
class _Rate:
    """Decaying sums of output tokens, step seconds and steps."""

    tokens: float = 0.0
    seconds: float = 0.0
    steps: float = 0.0

    def add(self, tokens: int, seconds: float, decay: float) -> None:
        self.tokens = self.tokens * decay + tokens
        self.seconds = self.seconds * decay + seconds
        self.steps = self.steps * decay + 1.0

    @property
    def measured(self) -> bool:
        return self.steps > 0.0

    @property
    def per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0.0 else 0.0

    @property
    def step_seconds(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0


@dataclass
class _Bucket:
    smallest: int
    """The smallest batch size of the bucket."""
    rates: dict[bool, _Rate] = field(default_factory=lambda: {True: _Rate(), False: _Rate()})
    choice: bool = True
    """The mode this bucket runs (True: speculate) outside probes."""
    probe_left: int = 0
    """Steps of the other mode still to run in the current probe."""
    samples: int = 0
    """Samples of the chosen mode since the bucket last changed mode."""
    skip: bool = False
    """The next sample follows a change of mode: not counted."""
    next_probe: float = 0.0
    backoff: float = 1.0

    @property
    def mode(self) -> bool:
        return self.choice if self.probe_left == 0 else not self.choice


class SpecGate:
    """Decides per step whether the engine speculates (speculate) from what earlier steps measured
    (observe)."""

    def __init__(self, window: int = 8, probe_share: float = 0.02, hysteresis: float = 0.02,
                 probe_steps: int = 4, clock: Callable[[], float] = time.perf_counter):
        if window < 1:
            raise ValueError(f"window must be positive, got {window}")
        if probe_steps < 2:
            raise ValueError(f"probe_steps must be at least 2, got {probe_steps}")
        if not 0.0 < probe_share < 1.0:
            raise ValueError(f"probe_share must be in (0, 1), got {probe_share}")
        self.window, self.probe_share, self.hysteresis = window, probe_share, hysteresis
        self.probe_steps = probe_steps
        self.decay = 1.0 - 1.0 / window
        self.clock = clock
        self.buckets: dict[int, _Bucket] = {}
        self.switches = 0

    @staticmethod
    def bucket_of(num_seqs: int) -> int:
        return max(num_seqs, 1).bit_length()

    def speculate(self, num_seqs: int) -> bool:
        """Whether a step with this many running sequences speculates."""
        bucket = self.buckets.get(self.bucket_of(num_seqs))
        return True if bucket is None else bucket.mode

    def observe(self, num_seqs: int, speculated: bool, tokens: int, seconds: float) -> None:
        """One decode step's figures: whether it ran speculating, the tokens it emitted, its wall time."""
        key = self.bucket_of(num_seqs)
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = _Bucket(1 << (key - 1))
        if speculated != b.mode:
            return  # decided before the bucket changed mode
        if b.skip:
            b.skip = False
            return
        b.rates[speculated].add(tokens, seconds, self.decay)
        now = self.clock()
        if b.probe_left:
            b.probe_left -= 1
            ran = self.probe_steps - b.probe_left
            hopeless = ran >= 2 and b.rates[speculated].per_second < 0.5 * b.rates[b.choice].per_second
            if b.probe_left == 0 or hopeless:
                b.probe_left = 0
                self._choose(b, now, after_probe=True)
            return
        b.samples += 1
        measured = b.rates[not b.choice].measured
        if b.samples < (self.window if measured else self.probe_steps):
            return
        if measured and self._choose(b, now, after_probe=False):
            return
        if not measured or now >= b.next_probe:
            b.rates[not b.choice] = _Rate()  # measured afresh: what it did long ago says little
            b.probe_left, b.skip = self.probe_steps, True

    def _choose(self, b: _Bucket, now: float, after_probe: bool) -> bool:
        """Run the faster mode (the chosen one keeps ties within the hysteresis); after a probe,
        or a change, schedule the next probe of the mode not chosen. Returns whether it changed."""
        kept, other = b.rates[b.choice].per_second, b.rates[not b.choice].per_second
        switch = other > kept * (1.0 + self.hysteresis)
        if switch:
            b.choice, b.samples, b.backoff = not b.choice, 0, 1.0
            self.switches += 1
            log.info("speculative decoding %s at %d+ running sequences: %.1f tokens/s speculating, %.1f plain",
                     "on" if b.choice else "off", b.smallest, b.rates[True].per_second,
                     b.rates[False].per_second)
        elif not after_probe:
            return False
        else:
            b.backoff *= 2.0  # the probe confirmed the choice: wait longer before the next
        b.skip = switch != after_probe  # the mode running next differs from the one that just ran
        probe_cost = self.probe_steps * b.rates[not b.choice].step_seconds
        b.next_probe = now + b.backoff * probe_cost / self.probe_share
        return switch

    def summary(self) -> dict[str, dict]:
        """Per bucket (its smallest batch size): the mode it runs and both measured rates."""
        out = {}
        for _, b in sorted(self.buckets.items()):
            out[str(b.smallest)] = {
                "speculating": b.choice,
                "spec_tokens_per_s": round(b.rates[True].per_second, 1),
                "plain_tokens_per_s": round(b.rates[False].per_second, 1)}
        return out
