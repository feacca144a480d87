"""The step planner with a fake runner: budgets, chunking, admission policies, preemption,
prefix hits and forks, with exact blocks and an integrity check after every step."""

import pytest

from gpu_engine.block_manager import BlockManager
from gpu_engine.scheduler import Scheduler, SchedulerConfig
from gpu_engine.sequence import SeqStatus
from tests.fakes import FakeRunner, make_request, run_to_completion

BS = 4


def make_scheduler(num_blocks=64, budget=64, max_seqs=8, policy="max_utilization", chunked=True, caching=True,
                   prefill_cap=None, tail_overcommit=0.0):
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=caching)
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy,
                          enable_chunked_prefill=chunked, max_prefill_tokens_per_seq=prefill_cap,
                          tail_overcommit=tail_overcommit)
    return Scheduler(cfg, bm)


def outputs_of(requests):
    return {r.request_id: [s.output_token_ids for s in sorted(r.seqs, key=lambda s: s.index)] for r in requests}


def reference_outputs(prompts, **params):
    sched = make_scheduler(num_blocks=256, budget=10_000, max_seqs=64)
    reqs = [make_request(f"r{i}", p, **params) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    run_to_completion(sched, FakeRunner())
    return outputs_of(reqs)


PROMPTS = [list(range(1, 1 + n)) for n in (3, 9, 14, 6, 21)]


def test_chunked_prefill_splits_a_long_prompt_across_steps():
    sched = make_scheduler(budget=8)
    req = make_request("a", list(range(20)), max_tokens=2)
    sched.add(req)
    runner = FakeRunner()
    run_to_completion(sched, runner)
    chunks = [(e.start, e.num_tokens, e.sample) for p in runner.plans for e in p.scheduled]
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True), (20, 1, True)]
    assert req.seqs[0].finish_reason == "length"


def test_prefill_cap_per_sequence_keeps_decodes_flowing_and_shares_the_budget():
    """A 30-token prompt beside a running decode and two short prompts: with a cap of 8 tokens per
    sequence per step, the decode runs every step and the short prompts start at once."""
    sched = make_scheduler(budget=20, prefill_cap=8)
    sched.add(make_request("run", [1, 2, 3], max_tokens=8))
    runner = FakeRunner()
    plan = sched.schedule()  # "run" prefills its 3 tokens
    runner.launch(plan)
    sched.commit(plan)
    sched.update(plan, runner.collect(plan))
    sched.add(make_request("long", list(range(100, 130)), max_tokens=1))
    sched.add(make_request("s1", [5, 6, 7, 8, 9], max_tokens=1))
    sched.add(make_request("s2", [40, 41], max_tokens=1))
    run_to_completion(sched, runner)
    steps = [[(e.seq.request.request_id, e.start, e.num_tokens) for e in p.scheduled]
             for p in runner.plans[1:]]
    assert steps[0] == [("run", 3, 1), ("long", 0, 8), ("s1", 0, 5), ("s2", 0, 2)]  # 16 of 20
    assert steps[1] == [("run", 4, 1), ("long", 8, 8)]
    assert steps[2] == [("run", 5, 1), ("long", 16, 8)]
    assert steps[3] == [("run", 6, 1), ("long", 24, 6)]
    assert steps[4] == [("run", 7, 1)]  # "long" finished with its one token
    assert [len(p.scheduled) for p in runner.plans[6:]] == [1] * len(runner.plans[6:])


def test_prefill_cap_is_off_without_chunked_prefill():
    sched = make_scheduler(budget=64, chunked=False, prefill_cap=4)
    sched.add(make_request("a", list(range(20)), max_tokens=1))
    runner = FakeRunner()
    run_to_completion(sched, runner)
    assert [(e.start, e.num_tokens) for p in runner.plans for e in p.scheduled] == [(0, 20)]


def test_without_chunking_a_prefill_waits_for_a_step_with_room():
    sched = make_scheduler(budget=10, chunked=False)
    sched.add(make_request("a", list(range(6)), max_tokens=3))
    sched.add(make_request("b", list(range(20, 28)), max_tokens=1))
    runner = FakeRunner()
    run_to_completion(sched, runner)
    first = [(e.seq.request.request_id, e.num_tokens) for e in runner.plans[0].scheduled]
    second = [(e.seq.request.request_id, e.num_tokens) for e in runner.plans[1].scheduled]
    assert first == [("a", 6)]  # b's 8 tokens don't fit beside a's 6
    assert second == [("a", 1), ("b", 8)]


def test_decodes_run_first_and_new_requests_join_between_steps():
    sched = make_scheduler(budget=12)
    sched.add(make_request("a", [1, 2, 3], max_tokens=5))
    runner = FakeRunner()
    plan = sched.schedule()
    runner.launch(plan); sched.commit(plan); sched.update(plan, runner.collect(plan))
    sched.add(make_request("b", list(range(30)), max_tokens=1))
    plan = sched.schedule()
    assert [(e.seq.request.request_id, e.start, e.num_tokens) for e in plan.scheduled] == [
        ("a", 3, 1), ("b", 0, 11)]
    assert plan.num_decodes == 1


def test_finished_sequences_leave_and_return_their_blocks_at_once():
    sched = make_scheduler(num_blocks=16)
    req = make_request("a", list(range(1, 9)), max_tokens=2)
    sched.add(req)
    runner = FakeRunner()
    run_to_completion(sched, runner)
    assert sched.block_manager.num_free_blocks == 16
    assert sched.running == [] and req.finished


def test_max_num_seqs_limits_the_running_batch():
    sched = make_scheduler(max_seqs=2)
    for i in range(4):
        sched.add(make_request(f"r{i}", [i + 1] * 3))
    plan = sched.schedule()
    assert [e.seq.request.request_id for e in plan.scheduled] == ["r0", "r1"]
    assert len(sched.waiting) == 2


def test_priority_then_arrival_orders_the_queue():
    sched = make_scheduler(max_seqs=1)
    sched.add(make_request("late-low", [1, 2], priority=5))
    sched.add(make_request("urgent", [3, 4], priority=-1))
    sched.add(make_request("normal", [5, 6], priority=0))
    assert [s.request.request_id for s in sched.waiting] == ["urgent", "normal", "late-low"]


def test_max_utilization_preempts_the_newest_and_recompute_changes_nothing():
    want = reference_outputs(PROMPTS, max_tokens=12)
    sched = make_scheduler(num_blocks=14, budget=64, max_seqs=8)
    reqs = [make_request(f"r{i}", p, max_tokens=12) for i, p in enumerate(PROMPTS)]
    for r in reqs:
        sched.add(r)
    run_to_completion(sched, FakeRunner())
    assert sched.num_preemptions > 0
    assert outputs_of(reqs) == want
    assert sched.block_manager.num_free_blocks == 14


def test_preemption_frees_the_victims_blocks_and_requeues_it_first():
    sched = make_scheduler(num_blocks=4, budget=64)
    old = make_request("old", [1] * 7, max_tokens=6)
    new = make_request("new", [2] * 7, max_tokens=6)
    sched.add(old)
    sched.add(new)
    runner = FakeRunner()
    plan = sched.schedule()  # both prefills: 2 blocks each, pool full
    assert [e.seq.block_table for e in plan.scheduled] == [[0, 1], [2, 3]]
    runner.launch(plan); sched.commit(plan); sched.update(plan, runner.collect(plan))
    plan = sched.schedule()  # both decode position 7, the end of their second block
    assert plan.preempted == []
    runner.launch(plan); sched.commit(plan); sched.update(plan, runner.collect(plan))
    plan = sched.schedule()  # position 8 needs a third block each: the pool has none
    victim = new.seqs[0]
    assert plan.preempted == [victim]
    assert victim.status is SeqStatus.WAITING and victim.block_table == [] and victim.num_computed_tokens == 0
    assert [e.seq for e in plan.scheduled] == [old.seqs[0]]
    # The victim's blocks were full and cached; freed tail first, its block 3 is evicted first.
    assert old.seqs[0].block_table == [0, 1, 3]
    assert sched.block_manager.num_cached_blocks == 1  # block 2 keeps the victim's first block for its recompute
    sched.block_manager.check_integrity()


def test_guaranteed_no_evict_reserves_prompt_plus_max_tokens_and_never_preempts():
    sched = make_scheduler(num_blocks=8, policy="guaranteed_no_evict")
    a = make_request("a", [1] * 8, max_tokens=8)  # needs 4 blocks to finish
    b = make_request("b", [2] * 8, max_tokens=12)  # needs 5
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert [e.seq.request.request_id for e in plan.scheduled] == ["a"]
    runner = FakeRunner()
    run_to_completion(sched, runner)
    assert sched.num_preemptions == 0
    first_b = next(i for i, p in enumerate(runner.plans) if any(e.seq is b.seqs[0] for e in p.scheduled))
    last_a = max(i for i, p in enumerate(runner.plans) if any(e.seq is a.seqs[0] for e in p.scheduled))
    assert first_b > last_a


def _tail_run(tail_overcommit):
    """Five requests needing 4 blocks each to finish, a pool of 18: four fit the reservations."""
    sched = make_scheduler(num_blocks=18, policy="guaranteed_no_evict", tail_overcommit=tail_overcommit,
                           caching=False)
    reqs = [make_request(f"r{i}", [i + 1] * 8, max_tokens=8) for i in range(5)]
    for r in reqs:
        sched.add(r)
    first = sched.schedule()
    runner = FakeRunner()
    runner.launch(first)
    sched.commit(first)
    sched.update(first, runner.collect(first))
    run_to_completion(sched, runner)  # checks the pool after every step
    return sched, reqs, first, runner


def test_tail_overcommit_admits_the_whole_queue_when_it_fits():
    sched, reqs, first, _ = _tail_run(0.0)
    assert len(first.scheduled) == 4 and sched.num_preemptions == 0  # the fifth waits: a tail
    plain = [r.seqs[0].output_token_ids for r in reqs]
    sched, reqs, first, _ = _tail_run(0.25)  # 20 blocks needed, 18 + 25% of 18 allowed
    assert len(first.scheduled) == 5
    assert sched.num_preemptions >= 1  # the pool ran out: the newest was recomputed
    assert [r.seqs[0].output_token_ids for r in reqs] == plain  # nothing a user sees changes
    assert all(len(r.seqs[0].output_token_ids) == 8 for r in reqs)


def test_tail_overcommit_leaves_a_queue_that_does_not_fit_waiting():
    sched, _, first, _ = _tail_run(0.05)  # 18 + 0.9 blocks: the fifth still does not fit
    assert len(first.scheduled) == 4 and sched.num_preemptions == 0
    with pytest.raises(ValueError, match="tail_overcommit must be in"):
        SchedulerConfig(tail_overcommit=1.5)


def test_prefix_cache_hit_shares_blocks_and_skips_their_compute():
    sched = make_scheduler(num_blocks=32)
    prefix = list(range(10, 22))  # three full blocks
    first = make_request("first", prefix + [1, 2], max_tokens=1)
    sched.add(first)
    runner = FakeRunner()
    run_to_completion(sched, runner)
    second = make_request("second", prefix + [3], max_tokens=2)
    sched.add(second)
    plan = sched.schedule()
    [entry] = plan.scheduled
    assert entry.start == 12 and entry.num_tokens == 1
    assert second.num_cached_tokens == 12
    assert sched.block_manager.prefix_hits == 3
    assert entry.seq.block_table[:3] == [0, 1, 2]
    assert [sched.block_manager.ref_count(b) for b in entry.seq.block_table[:3]] == [1, 1, 1]
    runner.launch(plan); sched.commit(plan); sched.update(plan, runner.collect(plan))
    run_to_completion(sched, runner)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    sched = make_scheduler()
    prompt = list(range(1, 9))  # exactly two blocks
    for rid in ("a", "b"):
        req = make_request(rid, prompt, max_tokens=1)
        sched.add(req)
        run_to_completion(sched, FakeRunner())
    assert req.num_cached_tokens == 4  # the last block holds the token whose logits we need


def test_prefix_caching_changes_no_output():
    shared = list(range(1, 13))
    prompts = [shared + [i] * (i + 1) for i in range(5)]
    want = reference_outputs(prompts, max_tokens=6)
    sched = make_scheduler(num_blocks=64, budget=16)
    reqs = [make_request(f"r{i}", p, max_tokens=6) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
        run_to_completion(sched, FakeRunner())
    assert sched.block_manager.prefix_hits >= 12
    assert outputs_of(reqs) == want


def test_n_samples_fork_after_the_prompt_sharing_its_blocks():
    sched = make_scheduler(num_blocks=32)
    req = make_request("a", list(range(1, 11)), max_tokens=3, n=3)  # 10 tokens: 2 full blocks + 2
    sched.add(req)
    runner = FakeRunner()
    plan = sched.schedule()
    assert plan.scheduled[0].num_samples == 3
    runner.launch(plan); sched.commit(plan); sched.update(plan, runner.collect(plan))
    assert [s.index for s in req.seqs] == [0, 1, 2]
    tables = [s.block_table for s in req.seqs]
    assert tables[0] == tables[1] == tables[2] == [0, 1, 2]
    assert [sched.block_manager.ref_count(b) for b in (0, 1, 2)] == [3, 3, 3]
    plan = sched.schedule()  # each writes position 10, inside the shared block 2
    assert plan.blocks_to_copy == [(2, 3), (2, 4)]  # the last writer keeps block 2
    assert [s.block_table for s in req.seqs] == [[0, 1, 3], [0, 1, 4], [0, 1, 2]]
    runner.launch(plan); sched.commit(plan); sched.update(plan, runner.collect(plan))
    run_to_completion(sched, runner)
    outs = [s.output_token_ids for s in req.seqs]
    assert len({tuple(o) for o in outs}) == 3
    assert sched.block_manager.num_free_blocks == 32


def test_forked_outputs_survive_preemption():
    prompts = [list(range(1, 8)), list(range(3, 12))]
    want = reference_outputs(prompts, max_tokens=10, n=2)
    sched = make_scheduler(num_blocks=9, budget=64)
    reqs = [make_request(f"r{i}", p, max_tokens=10, n=2) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    run_to_completion(sched, FakeRunner())
    assert sched.num_preemptions > 0
    assert outputs_of(reqs) == want


def test_abort_frees_blocks_at_once_wherever_the_request_is():
    sched = make_scheduler(num_blocks=16, max_seqs=1)
    running = make_request("running", [1] * 9, max_tokens=20)
    waiting = make_request("waiting", [2] * 5, max_tokens=20)
    sched.add(running)
    sched.add(waiting)
    plan = sched.schedule()
    r = FakeRunner(); r.launch(plan); sched.commit(plan); sched.update(plan, r.collect(plan))
    assert sched.block_manager.num_free_blocks == 13
    sched.abort(running)
    sched.abort(waiting)
    assert sched.block_manager.num_free_blocks == 16
    assert running.finished and waiting.finished
    assert running.seqs[0].finish_reason == "abort"
    assert sched.num_unfinished == 0
    sched.block_manager.check_integrity()


def test_eos_min_tokens_and_stop_token_ids():
    from gpu_engine.scheduler import PENDING, SampledToken

    sched = make_scheduler()
    req = make_request("a", [1, 2, 3], max_tokens=10, ignore_eos=False, min_tokens=2, stop_token_ids=[7])
    sched.add(req)
    seq = req.seqs[0]
    seq.status = SeqStatus.RUNNING  # drive _append directly, as update() does after a commit
    sched.waiting.remove(seq)
    sched.running.append(seq)

    def draw(token):
        seq.token_ids.append(PENDING)
        seq.num_pending += 1
        sched._append(seq, SampledToken(token))

    draw(5)
    draw(7)  # second token: min_tokens reached only after it
    assert not seq.is_finished
    draw(7)
    assert (seq.finish_reason, seq.stop_reason) == ("stop", 7)
    assert seq.output_token_ids == [5, 7, 7]


def test_a_stop_drops_tokens_drafted_after_it():
    from gpu_engine.scheduler import PENDING, SampledToken

    sched = make_scheduler()
    req = make_request("a", [1, 2, 3], max_tokens=10, ignore_eos=False)
    sched.add(req)
    seq = req.seqs[0]
    seq.token_ids += [PENDING, PENDING]  # two launched steps not collected yet
    seq.num_pending = 2
    sched._append(seq, SampledToken(49))  # EOS in the first
    assert seq.finish_reason == "stop"
    assert seq.token_ids == [1, 2, 3, 49] and seq.num_pending == 0


@pytest.mark.parametrize("policy", ["max_utilization", "guaranteed_no_evict"])
def test_many_requests_tiny_pool_tiny_budget_finish_with_pool_intact(policy):
    prompts = [[(i * 7 + j) % 40 + 1 for j in range(3 + (i * 5) % 17)] for i in range(12)]
    want = reference_outputs(prompts, max_tokens=7)
    sched = make_scheduler(num_blocks=12, budget=6, max_seqs=4, policy=policy)
    reqs = [make_request(f"r{i}", p, max_tokens=7) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    run_to_completion(sched, FakeRunner())
    assert outputs_of(reqs) == want
    assert sched.block_manager.num_free_blocks == 12


@pytest.mark.parametrize("num_blocks, budget", [(64, 64), (14, 64), (12, 6)])
def test_overlapped_steps_give_the_same_outputs(num_blocks, budget):
    """Planning step N+1 before step N is read back (placeholders fed on the device) changes nothing,
    with preemption and chunked prefill in play."""
    want = reference_outputs(PROMPTS, max_tokens=9)
    sched = make_scheduler(num_blocks=num_blocks, budget=budget, max_seqs=4)
    reqs = [make_request(f"r{i}", p, max_tokens=9) for i, p in enumerate(PROMPTS)]
    for r in reqs:
        sched.add(r)
    run_to_completion(sched, FakeRunner(), overlap=True)
    assert outputs_of(reqs) == want
    assert all(s.num_pending == 0 for r in reqs for s in r.seqs)
    assert sched.block_manager.num_free_blocks == num_blocks


def test_overlap_never_schedules_past_max_tokens():
    sched = make_scheduler()
    req = make_request("a", [1, 2, 3], max_tokens=3)
    sched.add(req)
    runner = FakeRunner()
    run_to_completion(sched, runner, overlap=True)
    assert sum(e.sample for p in runner.plans for e in p.scheduled) == 3
    assert len(req.seqs[0].output_token_ids) == 3
