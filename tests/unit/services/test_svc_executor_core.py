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
    assert d.error[0] == "InvalidRequest" and "token ids" in d.error[1]


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
