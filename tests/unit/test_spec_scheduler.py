"""Verify entries in the step planner (speculative decoding) with the fake runner: drafts planned as
1 + k token entries under the budget, KV blocks past the accepted tokens freed (exact block ids),
no prefix-cache hash for a rejected token, stops inside an accepted run, preemption."""

from gpu_engine.block_manager import BlockManager, hash_token_blocks
from gpu_engine.scheduler import Scheduler, SchedulerConfig
from tests.fakes import FakeRunner, fake_next_token, make_request, run_step, run_to_completion

BS = 4


def make_scheduler(num_blocks=16, budget=64, max_seqs=8):
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=True)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs), bm)


def continuation(tokens, n, index=0):
    """The fake model's next n tokens after `tokens`."""
    tokens, out = list(tokens), []
    for _ in range(n):
        out.append(fake_next_token(tokens, index))
        tokens.append(out[-1])
    return out


def prefilled_request(max_tokens=20):
    """A scheduler with one request "a" whose prompt step has run: (scheduler, request, its sequence)."""
    sched = make_scheduler()
    req = make_request("a", [1, 2, 3], max_tokens=max_tokens)
    sched.add(req)
    run_step(sched, FakeRunner())
    return sched, req, req.seqs[0]


def check(sched):
    sched.block_manager.check_integrity([b for s in sched.running for b in s.block_table])
    sched.batch.check(sched.running)


def test_rejected_drafts_free_their_blocks_and_register_no_hash():
    sched = make_scheduler()
    req = make_request("a", [1, 2, 3, 4, 5, 6], max_tokens=20)
    sched.add(req)
    runner = FakeRunner()
    run_step(sched, runner)  # the prompt: positions 0..5 in blocks 0, 1
    seq = req.seqs[0]
    assert seq.block_table == [0, 1] and seq.num_tokens == 7
    right = continuation(seq.token_ids, 4)
    sched.set_drafts(seq, [(t + 1) % 40 for t in right])  # every draft wrong
    plan = run_step(sched, runner)
    (entry,) = plan.entries
    assert (entry.start, entry.num_tokens, entry.draft_token_ids) == (6, 5, [(t + 1) % 40 for t in right])
    # positions 6..10 took block 2; only the correction was emitted: KV valid up to position 6
    assert seq.output_token_ids == [seq.token_ids[6], right[0]] and seq.num_computed_tokens == 7
    assert seq.block_table == [0, 1] and sched.block_manager.num_free_blocks == 14
    assert seq.num_registered_blocks == 1  # block 1 holds position 7, not computed yet
    check(sched)
    # now the right drafts: all four accepted plus the bonus token
    right = continuation(seq.token_ids, 5)
    sched.set_drafts(seq, right[:4])
    plan = run_step(sched, runner)
    assert plan.entries[0].num_tokens == 5
    assert seq.token_ids[8:] == right and seq.num_computed_tokens == 12
    assert seq.block_table == [0, 1, 3]  # block 2 went to the back of the free list
    assert seq.num_registered_blocks == 3
    assert seq.block_hashes == hash_token_blocks(seq.token_ids[:12], BS)
    assert (seq.num_draft_tokens, seq.num_accepted_tokens) == (8, 4)
    stats = sched.spec_stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (2, 8, 4)
    assert stats.num_accepted_tokens_per_pos == [1, 1, 1, 1]
    check(sched)


def test_outputs_equal_plain_decoding_whatever_is_drafted():
    prompts = [list(range(1, 1 + n)) for n in (3, 9, 14, 6)]

    def run(draft):
        sched = make_scheduler(num_blocks=64, budget=24)
        reqs = [make_request(f"r{i}", p, max_tokens=11) for i, p in enumerate(prompts)]
        for r in reqs:
            sched.add(r)
        runner = FakeRunner()
        while sched.num_unfinished:
            for seq in sched.running:
                if seq.num_uncomputed_tokens == 1 and draft:
                    sched.set_drafts(seq, draft(seq))
            run_step(sched, runner)
            check(sched)
        return [r.seqs[0].output_token_ids for r in reqs], runner

    want, _ = run(None)
    right, runner = run(lambda s: continuation(s.token_ids, 3))
    assert right == want and all(len(o) == 11 for o in right)  # max_tokens inside accepted runs
    assert any(e.is_verify for p in runner.plans for e in p.entries)
    assert all(p.num_tokens <= 24 for p in runner.plans)
    half = run(lambda s: continuation(s.token_ids, 2) + [0, 0])[0]
    assert half == want


def test_a_stop_token_inside_an_accepted_run_ends_the_sequence_there():
    sched, req, seq = prefilled_request()
    right = continuation(seq.token_ids, 5)
    req.params = req.params.__class__(max_tokens=20, ignore_eos=True, stop_token_ids=[right[1]])
    sched.set_drafts(seq, right[:4])
    run_step(sched, FakeRunner())
    assert seq.finish_reason == "stop" and seq.stop_reason == right[1]
    assert seq.output_token_ids[1:] == right[:2] and seq.block_table == []
    assert sched.block_manager.num_free_blocks == 16


def test_a_finished_sequence_holds_no_drafts():
    sched, req, seq = prefilled_request()
    sched.set_drafts(seq, [7, 8])
    assert sched.batch.drafting[seq.slot]
    sched.abort(req)
    assert seq.draft_token_ids == [] and not sched.batch.drafting.any()
    assert sched.block_manager.num_free_blocks == 16


def test_drafts_fit_the_budget():
    sched = make_scheduler(budget=4)
    a = make_request("a", [1, 2, 3], max_tokens=8)
    sched.add(a)
    run_step(sched, FakeRunner())
    seq = a.seqs[0]
    sched.set_drafts(seq, continuation(seq.token_ids, 6))
    plan = run_step(sched, FakeRunner())
    assert plan.entries[0].num_tokens == 4  # 1 + 3 drafts: the budget
    assert seq.num_draft_tokens == 3 and seq.num_output_tokens == 5


def test_a_short_pool_drops_drafts_and_a_preempted_sequence_forgets_them():
    sched = make_scheduler(num_blocks=4)
    a = make_request("a", [1, 2, 3], max_tokens=8, priority=1)
    b = make_request("b", [4, 5, 6, 7, 8, 9, 10], max_tokens=8)
    sched.add(a)
    sched.add(b)
    runner = FakeRunner()
    run_step(sched, runner)  # b (first by priority) in blocks 0, 1, a in block 2
    sa, sb = a.seqs[0], b.seqs[0]
    sched.set_drafts(sa, continuation(sa.token_ids, 4))
    run_step(sched, runner)  # a's verify takes the last free block
    assert sa.block_table == [2, 3] and sa.num_computed_tokens == 8
    sched.set_drafts(sa, continuation(sa.token_ids, 4))
    plan = run_step(sched, runner)  # no block for a's drafts nor its decode: a is preempted for b
    assert plan.preempted == [sa] and sa.draft_token_ids == [] and not sched.batch.drafting.any()
    run_to_completion(sched, runner)
    assert sa.output_token_ids == continuation(a.prompt_token_ids, 8)
    assert sb.output_token_ids == continuation(b.prompt_token_ids, 8)
