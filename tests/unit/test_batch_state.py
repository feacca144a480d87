"""The persistent batch on the scheduler side: slots, rows that agree with the sequences after every
step, block-table writes that rebuild every table exactly, and the packed (array) update path
giving the same outputs and the same blocks as the entry-by-entry path."""

import numpy as np
import pytest

from gpu_engine.batch_state import BatchState
from gpu_engine.block_manager import BlockManager
from gpu_engine.sampling_params import OutputKind
from gpu_engine.scheduler import Scheduler, SchedulerConfig
from gpu_engine.sequence import Sequence
from gpu_engine.step_plan import StepPlan, StepResult
from tests.fakes import FakeRunner, make_request

BS = 4


class PackedFakeRunner(FakeRunner):
    """The same deterministic tokens as FakeRunner, returned packed (one row per sample) as the
    real runner does."""

    def collect(self, plan):
        samples = super().collect(plan).samples
        return StepResult(token_ids=np.array([s.token_id for per in samples for s in per], dtype=np.int64))


class TableMirror:
    """What the runner's device block table holds: only the plan's writes applied."""

    def __init__(self, capacity, width=64):
        self.table = np.full((capacity, width), -1, dtype=np.int64)

    def apply(self, plan):
        slots, cols, blocks = plan.table_writes
        self.table[slots, cols] = blocks

    def check(self, sched):
        for seq in sched.running:
            n = len(seq.block_table)
            assert self.table[seq.slot, :n].tolist() == seq.block_table, seq


def make_scheduler(num_blocks=64, budget=64, max_seqs=8, policy="max_utilization", caching=True):
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy), bm)


def drive(sched, runner, overlap=False, max_steps=2000, mirror=None):
    """run_to_completion, checking the batch rows and the mirrored tables after every step."""
    mirror = mirror or TableMirror(sched.config.max_num_seqs)
    inflight, steps, touched = None, 0, []
    while sched.num_unfinished or inflight is not None:
        plan = sched.schedule()
        launched = None
        if not plan.is_empty:
            mirror.apply(plan)
            mirror.check(sched)
            launched = runner.launch(plan)
            sched.commit(plan)
        if not overlap and launched is not None:
            touched += sched.update(launched, runner.collect(launched))
            launched = None
        if inflight is not None:
            touched += sched.update(inflight, runner.collect(inflight))
        inflight = launched
        sched.block_manager.check_integrity()
        sched.batch.check(sched.running)
        steps += 1
        assert steps < max_steps
    return touched


def outputs_of(reqs):
    return {r.request_id: [s.output_token_ids for s in sorted(r.seqs, key=lambda s: s.index)] for r in reqs}


def workload(**params):
    prompts = [[(i * 7 + j) % 40 + 1 for j in range(3 + (i * 5) % 17)] for i in range(12)]
    prompts += [prompts[0][:8] + [5, 6]]  # shares a prefix with the first
    reqs = [make_request(f"r{i}", p, max_tokens=7 + i % 3, **params) for i, p in enumerate(prompts)]
    reqs.append(make_request("forks", [9, 8, 7, 6, 5], max_tokens=6, n=3, **params))
    return reqs


def test_slots_are_reused_lowest_first_and_counters_move_with_the_sequence():
    batch = BatchState(4, BS)
    reqs = [make_request(f"r{i}", [1, 2, 3]) for i in range(3)]
    seqs = [Sequence(r, 0, [1, 2, 3], 3, num_computed_tokens=2, block_table=[5]) for r in reqs]
    assert [batch.assign(s) for s in seqs] == [0, 1, 2]
    assert seqs[1].num_computed_tokens == 2 and batch.num_computed[1] == 2
    seqs[1].num_computed_tokens = 3
    assert batch.num_computed[1] == 3
    batch.release(seqs[1])
    assert seqs[1].slot == -1 and seqs[1].num_computed_tokens == 3  # back in the object
    assert batch.order().tolist() == [0, 2]
    assert batch.assign(seqs[1]) == 1  # the lowest free slot again, joined last
    assert batch.order().tolist() == [0, 2, 1]
    (slots, cols, blocks), events = batch.take_changes()
    assert (slots.tolist(), cols.tolist(), blocks.tolist()) == ([0, 1, 2, 1], [0, 0, 0, 0], [5, 5, 5, 5])
    assert [(s, None if q is None else q.request.request_id) for s, q in events] == [
        (0, "r0"), (1, "r1"), (2, "r2"), (1, None), (1, "r1")]  # in order: released, then taken again


def test_a_full_batch_and_a_double_assign_are_errors():
    batch = BatchState(1, BS)
    seq = Sequence(make_request("a", [1]), 0, [1], 1)
    batch.assign(seq)
    with pytest.raises(RuntimeError, match="already holds slot 0"):
        batch.assign(seq)
    with pytest.raises(RuntimeError, match="all 1 batch slots"):
        batch.assign(Sequence(make_request("b", [1]), 0, [1], 1))


def test_check_catches_a_row_that_disagrees():
    sched = make_scheduler()
    sched.add(make_request("a", [1, 2, 3, 4, 5], max_tokens=3))
    plan = sched.schedule()
    sched.commit(plan)
    sched.batch.check(sched.running)
    sched.batch.num_tokens[0] += 1
    with pytest.raises(AssertionError, match="slot 0"):
        sched.batch.check(sched.running)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("num_blocks, budget", [(256, 200), (20, 200), (14, 6)])
def test_packed_results_give_the_same_outputs_and_blocks_as_per_entry_results(overlap, num_blocks, budget):
    runs = []
    for runner in (FakeRunner(), PackedFakeRunner()):
        sched = make_scheduler(num_blocks=num_blocks, budget=budget, max_seqs=6)
        reqs = workload()
        for r in reqs:
            sched.add(r)
        drive(sched, runner, overlap=overlap)
        runs.append((outputs_of(reqs), [[p.decode_slots.tolist() for p in runner.plans]],
                     sched.num_preemptions, sched.block_manager.prefix_hits,
                     sched.block_manager.take_events()))  # the same blocks cached, under the same hashes
    assert runs[0] == runs[1]
    if num_blocks == 14:
        assert runs[0][2] > 0  # preemption was exercised


def test_plain_decodes_are_planned_as_arrays_in_running_order():
    sched = make_scheduler(budget=100)
    reqs = [make_request(f"r{i}", list(range(1, 4 + i)), max_tokens=5) for i in range(3)]
    for r in reqs:
        sched.add(r)
    runner = PackedFakeRunner()
    plan = sched.schedule()
    assert plan.num_plain_decodes == 0 and len(plan.entries) == 3  # all prefill
    sched.commit(plan)
    sched.update(plan, runner.collect(plan))
    plan = sched.schedule()
    assert [s.request.request_id for s in plan.decode_seqs] == ["r0", "r1", "r2"]
    assert plan.decode_positions.tolist() == [3, 4, 5]
    assert [(e.seq.request.request_id, e.start, e.num_tokens) for e in plan.scheduled] == [
        ("r0", 3, 1), ("r1", 4, 1), ("r2", 5, 1)]
    assert plan.num_decodes == 3 and plan.num_tokens == 3


@pytest.mark.parametrize("overlap", [False, True])
def test_a_preempted_decode_leaves_the_plan_and_gets_its_pending_token(overlap, monkeypatch):
    """A prefill that runs out of blocks preempts a lower-priority sequence already planned as a
    plain decode: it leaves the plan's arrays, and its pending token is still filled in."""
    dropped = []
    original = StepPlan.drop_decode
    monkeypatch.setattr(StepPlan, "drop_decode", lambda plan, seq: dropped.append(original(plan, seq)) or dropped[-1])

    def run(num_blocks, runner):
        sched = make_scheduler(num_blocks=num_blocks, budget=6, max_seqs=4)
        low = make_request("low", [1, 2, 3], max_tokens=8, priority=1)
        high = make_request("high", list(range(10, 26)), max_tokens=2)
        sched.add(low)
        mirror = TableMirror(4)
        plan = sched.schedule()
        mirror.apply(plan)
        runner.launch(plan)
        sched.commit(plan)
        sched.update(plan, runner.collect(plan))
        sched.add(high)
        drive(sched, runner, overlap=overlap, mirror=mirror)
        return sched, outputs_of([low, high])

    want = run(64, FakeRunner())[1]
    sched, got = run(5, PackedFakeRunner())
    assert sched.num_preemptions > 0 and True in dropped
    assert got == want


def test_update_returns_only_what_is_due():
    sched = make_scheduler(budget=100)
    quiet = make_request("quiet", [1, 2, 3], max_tokens=3, output_kind=OutputKind.FINAL_ONLY)
    loud = make_request("loud", [4, 5, 6], max_tokens=3, output_kind=OutputKind.DELTA)
    for r in (quiet, loud):
        sched.add(r)
    runner = PackedFakeRunner()
    seen = []
    while sched.num_unfinished:
        plan = sched.schedule()
        runner.launch(plan)
        sched.commit(plan)
        seen.append(sorted((s.request.request_id, s.is_finished) for s in sched.update(plan, runner.collect(plan))))
    assert seen == [[("loud", False)], [("loud", False)], [("loud", True), ("quiet", True)]]
    assert "first_token" in quiet.metrics and "first_token" in loud.metrics


def test_guaranteed_no_evict_reserves_from_the_rows():
    sched = make_scheduler(num_blocks=16, budget=100, policy="guaranteed_no_evict")
    first = make_request("a", [1] * 6, max_tokens=10)  # 16 tokens: 4 blocks
    sched.add(first)
    runner = PackedFakeRunner()
    plan = sched.schedule()
    sched.commit(plan)
    sched.update(plan, runner.collect(plan))
    assert sched.admission.reserved(sched) == 4 - 2  # 2 blocks held, 2 still to come
    sched.add(make_request("b", [2] * 6, max_tokens=10, n=2))  # 4 blocks, and a fork needing 3
    plan = sched.schedule()
    assert [e.seq.request.request_id for e in plan.entries] == ["b"]
    assert len(plan.entries[0].forks) == 1  # forked as its prompt is planned
    # a: 2 to come; b and its fork: 2 each to come, and one copy each of the shared partial block
    # (only one of them will copy it: an upper bound)
    assert sched.admission.reserved(sched) == 2 + (2 + 1) + (2 + 1)


@pytest.mark.parametrize("overlap", [False, True])
def test_samples_still_to_fork_keep_their_seats(overlap):
    """A chunked prompt with n=3 holds seats for its two forks, so later admissions never take
    the slots its samples need."""
    sched = make_scheduler(num_blocks=64, budget=6, max_seqs=4)
    forking = make_request("fork", list(range(1, 15)), max_tokens=3, n=3)
    others = [make_request(f"o{i}", [i + 1, i + 2], max_tokens=3) for i in range(3)]
    for r in [forking, *others]:
        sched.add(r)
    runner = PackedFakeRunner()
    seen = []
    original = sched.schedule

    def schedule():
        plan = original()
        seen.append(len(sched.running))
        return plan

    sched.schedule = schedule
    drive(sched, runner, overlap=overlap)
    assert max(seen) <= 4 and [len(s.output_token_ids) for s in forking.seqs] == [3, 3, 3]
    assert all(r.finished for r in others)
