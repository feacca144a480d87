"""SpecGate: speculate where it measures faster, probe the other mode for a bounded share of time."""

import pytest

from gpu_engine.spec.config import SpeculativeConfig
from gpu_engine.spec.gate import SpecGate


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(gate: SpecGate, clock: Clock, steps: int, cost, num_seqs: int = 1) -> dict:
    """Drive the gate: cost(speculating) -> (tokens, seconds) of one step. Returns the time and
    tokens spent in each mode."""
    spent = {True: [0.0, 0], False: [0.0, 0]}
    for _ in range(steps):
        mode = gate.speculate(num_seqs)
        tokens, seconds = cost(mode)
        clock.now += seconds
        gate.observe(num_seqs, mode, tokens, seconds)
        spent[mode][0] += seconds
        spent[mode][1] += tokens
    return spent


def costs(spec_tokens: float, spec_seconds: float, plain_seconds: float = 1.0):
    return lambda speculating: (spec_tokens, spec_seconds) if speculating else (1, plain_seconds)


def test_a_new_bucket_speculates_first():
    assert SpecGate().speculate(1) is True
    assert SpecGate().speculate(300) is True


def test_speculation_that_pays_stays_on_and_plain_probes_take_a_bounded_share():
    clock = Clock()
    gate = SpecGate(window=8, probe_share=0.02, clock=clock)
    spent = run(gate, clock, 5000, costs(spec_tokens=3, spec_seconds=1.2))
    assert gate.speculate(1) is True
    plain_share = spent[False][0] / (spent[True][0] + spent[False][0])
    assert 0 < plain_share < 0.02  # the first measurement, then probes whose wait keeps doubling
    rate = (spent[True][1] + spent[False][1]) / (spent[True][0] + spent[False][0])
    assert rate > 0.97 * 3 / 1.2


def test_speculation_that_costs_turns_itself_off_within_ten_steps():
    clock = Clock()
    gate = SpecGate(window=8, probe_share=0.02, clock=clock)
    run(gate, clock, 9, costs(spec_tokens=1, spec_seconds=2.0))  # 4 speculating, 1 skipped, 4 plain
    assert gate.speculate(1) is False
    spent = run(gate, clock, 20000, costs(spec_tokens=1, spec_seconds=2.0))
    total = spent[True][0] + spent[False][0]
    assert spent[True][0] / total < 0.03  # only probes speculate
    assert (spent[True][1] + spent[False][1]) / total > 0.95  # tokens/s within 5% of plain's 1.0


def test_a_probe_of_a_mode_at_less_than_half_the_rate_ends_after_two_steps():
    clock = Clock()
    gate = SpecGate(window=8, probe_steps=4, clock=clock)
    # 4 speculating, then the plain probe: one step skipped (the change of mode), one counted
    run(gate, clock, 6, costs(spec_tokens=5, spec_seconds=1.0))
    assert gate.speculate(1) is False
    run(gate, clock, 1, costs(spec_tokens=5, spec_seconds=1.0))  # plain runs at a fifth of the rate
    assert gate.speculate(1) is True and gate.buckets[1].probe_left == 0  # after 2 of its 4 steps


def test_a_drop_in_acceptance_switches_to_plain_within_a_few_windows():
    clock = Clock()
    gate = SpecGate(window=8, clock=clock)
    run(gate, clock, 200, costs(spec_tokens=3, spec_seconds=1.2))
    assert gate.speculate(1) is True
    switches = gate.switches
    run(gate, clock, 24, costs(spec_tokens=1, spec_seconds=1.2))  # a prompt whose drafts all fail
    assert gate.speculate(1) is False and gate.switches == switches + 1


def test_speculation_that_starts_paying_is_found_by_the_next_probe():
    clock = Clock()
    gate = SpecGate(window=8, probe_share=0.02, clock=clock)
    run(gate, clock, 100, costs(spec_tokens=1, spec_seconds=2.0))
    assert gate.speculate(1) is False
    # a probe of 8 speculating steps of 2 s is due 8 * 2 / 0.02 = 800 s after the last change
    run(gate, clock, 1200, costs(spec_tokens=4, spec_seconds=1.2))
    assert gate.speculate(1) is True


def test_batch_sizes_are_measured_apart():
    clock = Clock()
    gate = SpecGate(window=4, clock=clock)
    run(gate, clock, 50, costs(spec_tokens=1, spec_seconds=3.0), num_seqs=1)
    run(gate, clock, 50, costs(spec_tokens=3, spec_seconds=1.1), num_seqs=8)
    assert gate.speculate(1) is False and gate.speculate(8) is True
    assert gate.speculate(9) is True  # 8..15 share a bucket
    summary = gate.summary()
    assert summary["1"]["speculating"] is False and summary["8"]["speculating"] is True
    assert summary["1"]["plain_tokens_per_s"] == pytest.approx(1.0)


def test_a_sample_decided_under_the_other_mode_is_not_counted():
    gate = SpecGate(window=2, clock=Clock())
    for _ in range(5):
        gate.observe(1, False, 100, 0.01)  # the bucket speculates: plain samples are stale
    assert gate.speculate(1) is True and not gate.buckets[1].rates[False].measured


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="window"):
        SpecGate(window=0)
    with pytest.raises(ValueError, match="probe_share"):
        SpecGate(probe_share=1.5)
    with pytest.raises(ValueError, match="disable_when_slower"):
        SpeculativeConfig("ngram", 3, disable_when_slower="yes")
