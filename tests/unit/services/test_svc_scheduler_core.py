"""SchedulerCore: queue order, the bound, capacity and placement (prefix cache first), lost
executors, resubmissions, acknowledgements, and a restart's reconciliation."""

from __future__ import annotations

from gpu_engine.block_manager import hash_token_blocks
from gpu_engine.sampling_params import SamplingParams
from services.common.types import EngineRequest, ExecutorState, KvEvent
from services.scheduler.core import AbortOn, Ack, Admit, Notify, SchedulerCore
from services.scheduler.policy import CapacityPolicy


def req(rid, prompt=(1, 2, 3, 4, 5), priority=0, arrival=0.0, **kw):
    return EngineRequest(rid, "gw", tuple(prompt), SamplingParams(max_tokens=4), priority=priority,
                         arrival_time=arrival, **kw)


def state(eid, free=100, total=100, running=0, max_seqs=8, last_admit=0, **kw):
    return ExecutorState(eid, num_total_blocks=total, num_free_blocks=free, block_size=4,
                         num_running=running, max_num_seqs=max_seqs, last_admit_seq=last_admit, **kw)


def core_with(*executors, **kw):
    core = SchedulerCore(**kw)
    for eid, st in executors:
        core.executor_found(eid, f"{eid}:1", 0.0)
        core.executor_state(st, 0.0)
    return core


def admits(actions):
    return [(a.executor_id, a.request.request_id) for a in actions if isinstance(a, Admit)]


def test_priority_then_arrival_order():
    core = core_with()
    for rid, prio, t in [("late", 0, 2.0), ("early", 0, 1.0), ("urgent", -1, 3.0)]:
        core.submit(req(rid, priority=prio, arrival=t), f"id-{rid}", 0.0)
    core.executor_found("e", "e:1", 0.0)
    got = core.executor_state(state("e"), 0.0)
    assert [r for _, r in admits(got)] == ["urgent", "early", "late"]


def test_bounded_queue_rejects_with_overloaded():
    core = core_with(max_waiting=1)
    assert core.submit(req("a"), "1", 0.0) == []
    actions = core.submit(req("b"), "2", 0.0)
    notify = next(a for a in actions if isinstance(a, Notify))
    assert notify.delta.error[0] == "Overloaded" and Ack(("2",)) in actions
    assert core.num_waiting == 1


def test_capacity_counts_admissions_not_yet_in_the_state():
    core = core_with(("e", state("e", free=6, total=100, max_seqs=8)),
                     capacity=CapacityPolicy(kv_watermark=0.0))
    got = []
    for i in range(4):  # 5 prompt tokens + 1 = 2 blocks each; 6 free blocks hold 3
        got += admits(core.submit(req(f"r{i}", prompt=(i, 9, 9, 9, 9)), str(i), 0.0))
    assert got == [("e", "r0"), ("e", "r1"), ("e", "r2")] and core.num_waiting == 1
    after = core.executor_state(state("e", free=6, running=0, last_admit=3,
                                      finished_request_ids=("r0", "r1", "r2")), 1.0)
    assert admits(after) == [("e", "r3")]
    assert {a.entry_ids for a in after if isinstance(a, Ack)} == {("0",), ("1",), ("2",)}


def test_batch_slots_limit_admission():
    core = core_with(("e", state("e", max_seqs=2, running=1)))
    got = admits(core.submit(req("a"), "1", 0.0) + core.submit(req("b"), "2", 0.0))
    assert got == [("e", "a")]


def test_placement_prefers_the_executor_caching_the_prefix_then_free_blocks():
    prompt = tuple(range(20, 33))
    cached = tuple(KvEvent(True, h) for h in hash_token_blocks(list(prompt), 4))
    core = core_with(("roomy", state("roomy", free=100)),
                     ("warm", state("warm", free=50, kv_events=cached)))
    assert admits(core.submit(req("a", prompt=prompt), "1", 0.0)) == [("warm", "a")]
    assert admits(core.submit(req("b", prompt=(7, 7, 7, 7, 7)), "2", 0.0)) == [("roomy", "b")]


def test_lost_executor_sends_requests_back_and_resubmission_is_placed_elsewhere():
    core = core_with(("e1", state("e1")))
    core.submit(req("a"), "1", 0.0)
    core.executor_found("e2", "e2:1", 0.0)
    core.executor_state(state("e2"), 0.0)
    actions = core.executor_lost("e1", 1.0)
    (notice,) = [a for a in actions if isinstance(a, Notify)]
    assert notice.delta.executor_lost and notice.delta.attempt == 0
    resumed = req("a", attempt=1, prior_output_token_ids=(9, 9))
    actions = core.submit(resumed, "2", 1.0)
    assert Ack(("1",)) in actions and admits(actions) == [("e2", "a")]
    assert core.placement_of("a") == "e2"


def test_abort_of_a_placed_request_reaches_its_executor():
    core = core_with(("e", state("e")))
    core.submit(req("a"), "1", 0.0)
    actions = core.abort("a", "2")
    assert AbortOn("e", "e:1", ("a",)) in actions
    assert Ack(("1",)) in actions and Ack(("2",)) in actions
    assert core.placement_of("a") is None


def test_deadline_in_the_queue_and_silent_executors():
    core = core_with()
    core.submit(req("a", deadline=5.0), "1", 0.0)
    actions = core.tick(6.0)
    assert any(isinstance(a, Notify) and a.delta.error[0] == "DeadlineExceeded" for a in actions)
    assert core.num_waiting == 0
    core.executor_found("e", "e:1", 0.0)
    assert core.silent_executors(10.0, 3.0) == ["e"]


def test_restart_claims_requests_an_executor_still_runs():
    core = SchedulerCore()
    core.executor_found("e", "e:1", 0.0)
    core.executor_state(state("e", full=True, running_request_ids=("a", "ghost")), 0.0)
    assert admits(core.submit(req("a"), "1", 0.0)) == []  # re-read entry: it is running already
    assert core.placement_of("a") == "e"
    actions = core.tick(100.0)  # nobody claimed "ghost": abort it
    assert AbortOn("e", "e:1", ("ghost",)) in actions


def test_duplicate_entry_read_twice_is_ignored():
    core = core_with(("e", state("e")))
    core.submit(req("a"), "1", 0.0)
    assert core.submit(req("a"), "1", 0.0) == []
    assert core.submit(req("a"), "7", 0.0) == [Ack(("7",))]


def test_a_request_the_executor_refuses_fails_without_retry():
    from gpu_engine.errors import InvalidRequest

    core = core_with(("e", state("e")))
    core.submit(req("a"), "1", 0.0)
    actions = core.admit_failed("a", InvalidRequest("prompt too long"))
    (notice,) = [a for a in actions if isinstance(a, Notify)]
    assert notice.delta.error == ("InvalidRequest", "prompt too long") and Ack(("1",)) in actions
    assert core.placement_of("a") is None and core.executors["e"].requests == set()


def test_takeover_acknowledges_requests_that_ended_while_nobody_followed_them():
    from services.common.types import Ended

    core = SchedulerCore()
    core.executor_found("e", "e:1", 0.0)
    core.executor_state(state("e", full=True, ended=(Ended("done", 0), Ended("old", 0))), 0.0)
    assert core.submit(req("done"), "1", 0.0) == [Ack(("1",))]  # not admitted again
    actions = core.submit(req("old", attempt=1), "2", 0.0)  # a newer attempt than what ended
    assert admits(actions) == [("e", "old")]
    core.executor_state(state("e", ended=(Ended("gone", 0),)), 0.0)
    core.tick(100.0)  # remembered for orphan_grace_s only
    assert admits(core.submit(req("gone"), "4", 100.0)) == [("e", "gone")]


def test_a_waiting_entry_is_acknowledged_when_an_executor_found_later_says_it_ended():
    from services.common.types import Ended

    core = core_with(("e", state("e", running=1, max_seqs=1)))  # full: "late" waits
    assert core.submit(req("late"), "3", 0.0) == [] and core.num_waiting == 1
    core.executor_found("f", "f:1", 0.0)
    actions = core.executor_state(state("f", full=True, max_seqs=0, ended=(Ended("late", 0),)), 0.0)
    assert actions == [Ack(("3",))] and core.num_waiting == 0 and core.num_requests == 0


def test_an_orphan_that_finishes_before_its_entry_is_read_is_not_reattached():
    from services.common.types import Ended

    core = SchedulerCore()
    core.executor_found("e", "e:1", 0.0)
    core.executor_state(state("e", full=True, running_request_ids=("a", "b")), 0.0)
    core.executor_state(state("e", finished_request_ids=("a", "b"), ended=(Ended("a", 0),)), 0.0)
    assert core.submit(req("a"), "1", 0.0) == [Ack(("1",))]
    assert admits(core.submit(req("b"), "2", 0.0)) == [("e", "b")]  # aborted there: run it again
    assert core.num_requests == 1
