"""ExecutorCore over the fake engine: admission, deltas per gateway, aborts that free blocks at
once, deadlines, bad requests, resume, and the published state."""

from __future__ import annotations

from gpu_engine.sampling_params import SamplingParams
from services.common.types import EngineRequest
from services.executor.core import ExecutorCore
from services.executor.fake import FakeEngine


class Sink:
    def __init__(self):
        self.batches: list[tuple[str, list]] = []

    def __call__(self, gateway_id, deltas):
        self.batches.append((gateway_id, deltas))

    def deltas(self, rid):
        return [d for _, ds in self.batches for d in ds if d.request_id == rid]


def make(num_blocks=64, clock=None):
    sink = Sink()
    kwargs = {"clock": clock} if clock else {}
    core = ExecutorCore(FakeEngine(num_blocks=num_blocks, block_size=4), "e1", sink, **kwargs)
    return core, sink


def req(rid, prompt=(10, 11, 12), gw="g1", max_tokens=5, **kw):
    return EngineRequest(rid, gw, tuple(prompt), SamplingParams(max_tokens=max_tokens), **kw)


def run(core, steps=50):
    for _ in range(steps):
        if not core.step():
            return


def test_tokens_go_to_their_gateway_one_batch_per_step():
    core, sink = make()
    core.admit(req("a", gw="g1"), 1)
    core.admit(req("b", gw="g2", max_tokens=3), 2)
    core.step()
    assert sorted(g for g, _ in sink.batches) == ["g1", "g2"]
    run(core)
    a = sink.deltas("a")
    assert [t for d in a for t in d.token_ids] == [10, 11, 12, 10, 11]
    assert [d.first_index for d in a] == [0, 1, 2, 3, 4]
    assert a[0].num_prompt_tokens == 3 and a[-1].finish_reason == "length"
    state, _ = core.board.read(None, 0)
    assert state.num_free_blocks == 64 and state.last_admit_seq == 2


def test_abort_frees_blocks_before_the_next_step():
    core, sink = make()
    core.admit(req("a", max_tokens=100), 1)
    core.step()
    state, seen = core.board.read(None, 0)
    assert state.num_free_blocks < 64
    core.abort(["a", "unknown"])
    core.step()
    state, _ = core.board.read(seen, 0)
    assert state.num_free_blocks == 64 and state.finished_request_ids == ("a",)
    assert not core.engine.has_unfinished_requests()


def test_bad_request_is_reported_to_its_gateway():
    core, sink = make()
    core.admit(req("bad", prompt=(10, 10_000)), 1)
    core.step()
    (d,) = sink.deltas("bad")
    assert d.error[0] == "InvalidRequest" and "token id 10000, outside the vocabulary" in d.error[1]


def test_deadline_aborts_with_deadline_exceeded():
    now = [100.0]
    core, sink = make(clock=lambda: now[0])
    core.admit(req("a", max_tokens=100, deadline=101.0), 1)
    core.step()
    now[0] = 102.0
    core.step()
    last = sink.deltas("a")[-1]
    assert last.error[0] == "DeadlineExceeded" and last.finish_reason == "abort"
    assert core.engine.stats().num_free_blocks == 64


def test_resume_continues_after_the_prior_tokens():
    core, sink = make()
    core.admit(req("a", max_tokens=5, attempt=1, prior_output_token_ids=(10, 11)), 1)
    run(core)
    ds = sink.deltas("a")
    assert [t for d in ds for t in d.token_ids] == [12, 10, 11]
    assert ds[0].first_index == 2 and all(d.attempt == 1 for d in ds)


def test_state_board_full_snapshot_then_increments():
    core, _ = make()
    core.admit(req("a", prompt=tuple(range(10, 22)), max_tokens=50), 1)
    core.step()
    full, seen = core.board.read(None, 0)
    assert full.full and full.running_request_ids == ("a",)
    assert len(full.kv_events) == 3  # 12 prompt tokens = 3 full blocks of 4
    core.abort(["a"])
    core.step()
    inc, _ = core.board.read(seen, 0)
    assert not inc.full and inc.finished_request_ids == ("a",) and inc.kv_events == ()
    beat, _ = core.board.read(inc.seq, 0.01)  # nothing new: a heartbeat repeating the state
    assert beat.seq == inc.seq and beat.finished_request_ids == ()


def test_requests_that_end_on_their_own_are_remembered_aborted_ones_are_not():
    from services.common.types import Ended

    core, _ = make()
    core.admit(req("done", max_tokens=2), 1)
    core.admit(req("aborted", max_tokens=50), 2)
    core.admit(req("bad", prompt=(10, 10_000), attempt=2), 3)
    core.step()
    _, seen = core.board.read(None, 0)
    core.abort(["aborted"])
    run(core)
    inc, _ = core.board.read(seen, 0)
    assert set(inc.finished_request_ids) >= {"done", "aborted"}
    assert inc.ended == (Ended("done", 0),)  # "bad" ended at admission, before `seen`
    full, _ = core.board.read(None, 0)  # what a scheduler that takes over learns
    assert full.ended == (Ended("bad", 2), Ended("done", 0)) and full.running_request_ids == ()


def faulty(steps, num_blocks=64, max_step_failures=3, max_num_seqs=64):
    from services.executor.faults import StepFaults, parse_steps

    sink = Sink()
    engine = StepFaults(FakeEngine(num_blocks=num_blocks, block_size=4, max_num_seqs=max_num_seqs),
                        parse_steps(steps))
    return ExecutorCore(engine, "e1", sink, max_step_failures=max_step_failures), sink


def test_a_failed_step_fails_its_batch_with_internal_and_the_rest_goes_on():
    core, sink = faulty("2", max_num_seqs=1)
    core.admit(req("a", max_tokens=5), 1)
    core.admit(req("b", max_tokens=3), 2)  # waits: one sequence at a time
    core.step()  # a's first token
    core.step()  # the injected fault: a was the batch
    (*_, failed) = sink.deltas("a")
    assert failed.error == ("TaxiwayError", "executor e1: the engine step failed (InjectedFault: "
                            "injected fault in engine step 2); the request was aborted")
    assert failed.finish_reason == "abort" and failed.first_index == 1
    run(core)
    assert [t for d in sink.deltas("b") for t in d.token_ids] == [10, 11, 12]
    assert core.broken is None and core.engine.stats().num_free_blocks == 64
    state, _ = core.board.read(None, 0)
    from services.common.types import Ended
    assert Ended("a", 0) in state.ended  # the scheduler acknowledges it, never re-runs it


def test_repeated_failures_break_the_executor_and_run_returns():
    import threading

    core, sink = faulty("1-3")
    for i in range(3):
        core.admit(req(f"r{i}", max_tokens=50), i + 1)
        core.step()
    assert core.broken.startswith("3 engine steps failed in a row (max_step_failures=3)")
    core.run(threading.Event())  # returns at once: the service leaves the pool
    assert all(sink.deltas(f"r{i}")[-1].error[0] == "TaxiwayError" for i in range(3))


def test_a_device_error_breaks_at_once_and_a_broken_pool_too():
    from services.executor.core import is_device_error

    assert is_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_device_error(IndexError("index 5 is out of bounds"))
    core, _ = make()
    core.admit(req("a", max_tokens=50), 1)
    core.step()
    core.engine._free -= 3  # three blocks leak: the pool no longer adds up

    def boom():
        raise RuntimeError("boom")

    core.engine.step = boom
    core.step()
    assert core.broken == ("the KV block pool is inconsistent after a failed step: "
                           "3 blocks are held by no request")


def test_an_abort_then_an_admit_of_the_same_id_keeps_the_new_attempt():
    """The scheduler replaces an attempt: Abort(old) then Admit(new), before the next step."""
    core, sink = make()
    core.admit(req("a", max_tokens=50), 1)
    core.step()
    core.abort(["a"])
    core.admit(req("a", max_tokens=3, attempt=1, prior_output_token_ids=(10,)), 2)
    run(core)
    new = [d for d in sink.deltas("a") if d.attempt == 1]
    assert [t for d in new for t in d.token_ids] == [11, 12] and new[-1].finish_reason == "length"


def test_a_late_admit_of_an_older_attempt_never_replaces_a_newer_one():
    core, sink = make()
    core.admit(req("a", max_tokens=4, attempt=2, prior_output_token_ids=(10,)), 1)
    core.step()
    core.admit(req("a", max_tokens=4, attempt=1), 2)
    run(core)
    assert {d.attempt for d in sink.deltas("a")} == {2}
    assert [t for d in sink.deltas("a") for t in d.token_ids] == [11, 12, 10]


def test_the_fault_injection_setting_wraps_the_engine():
    import pytest

    from services.executor.config import ExecutorConfig
    from services.executor.faults import InjectedFault
    from services.executor.service import with_faults

    engine = FakeEngine()
    assert with_faults(engine, ExecutorConfig()) is engine  # off by default
    wrapped = with_faults(engine, ExecutorConfig(fault_step_errors="2,4-5"))
    engine.add_request("a", [10, 11], req("a").params)
    outcomes = []
    for _ in range(6):
        try:
            wrapped.step()
            outcomes.append("ok")
        except InjectedFault as exc:
            outcomes.append(str(exc))
    assert outcomes == ["ok", "injected fault in engine step 2", "ok",
                        "injected fault in engine step 4", "injected fault in engine step 5", "ok"]
    with pytest.raises(ValueError, match="fault_step_errors: 'x' is not a step number"):
        ExecutorConfig(fault_step_errors="x")
