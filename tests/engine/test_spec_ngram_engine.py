"""N-gram speculation inside the engine's step loop: greedy output token-identical to no
speculation (alone, batched, with chunked prefill, preemption and prefix-cache hits), the pool's
integrity after every step, stops / max_tokens / min_tokens / penalties / logprobs as without
speculation, seeded sampling reproducible, the batch-size threshold."""

from dataclasses import replace

import pytest

from gpu_engine.sampling_params import OutputKind
from taxiway import LLM, SamplingParams
from tests.engine.hf import random_prompts
from tests.engine.spec_helpers import NGRAM, generate_checked, tokens_of

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
# Prompts that repeat themselves (what prompt lookup is for), and random ones.
PROMPTS = [[5, 9, 17, 3, 88, 41, 7, 120] * 3, [200, 201, 202] * 6] + random_prompts(
    4, 320, seed=7, lengths=[5, 17, 33, 60])


def llm(path, spec=NGRAM, **kw):
    kw.setdefault("num_kv_blocks", 128)
    kw.setdefault("max_model_len", 256)
    return LLM(path, speculative_config=spec, **kw)


@pytest.fixture(scope="module")
def baseline(tiny_llama):
    return tokens_of(LLM(tiny_llama, num_kv_blocks=128, max_model_len=256).generate(PROMPTS, GREEDY))


def test_greedy_is_token_identical_alone_and_batched(tiny_llama, baseline):
    spec = llm(tiny_llama)
    alone = [tokens_of(generate_checked(spec, [p], GREEDY))[0] for p in PROMPTS]
    assert alone == baseline
    outs = generate_checked(spec, PROMPTS, GREEDY)
    assert tokens_of(outs) == baseline
    assert sum(o.num_accepted_tokens for o in outs) > 0  # the repeating prompts accept drafts
    assert all(0 <= o.num_accepted_tokens <= o.num_draft_tokens for o in outs)
    stats = spec.engine.scheduler.spec_stats
    assert stats.num_accepted_tokens == sum(stats.num_accepted_tokens_per_pos)
    es = spec.engine.stats()
    assert (es.spec_num_drafts, es.spec_num_draft_tokens, es.spec_num_accepted_tokens) == (
        stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)
    assert es.spec_num_accepted_tokens_per_pos == tuple(stats.num_accepted_tokens_per_pos)
    assert spec.engine.stats().num_free_blocks == 128
    assert "verify" in spec.engine.step_times.totals


@pytest.mark.parametrize("setting", [
    {"max_num_batched_tokens": 7},  # chunked prefill, and drafts cut to the budget
    {"num_kv_blocks": 14, "max_model_len": 128, "max_num_batched_tokens": 64},  # preemption
])
def test_chunked_prefill_and_preemption_change_nothing(tiny_llama, baseline, setting):
    spec = llm(tiny_llama, **setting)
    assert tokens_of(generate_checked(spec, PROMPTS, GREEDY)) == baseline
    if "num_kv_blocks" in setting:
        assert spec.engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits_change_nothing(tiny_llama):
    shared = PROMPTS[0] + PROMPTS[1][:8]
    prompts = [shared + p[:6] for p in PROMPTS[2:]]
    want = tokens_of(LLM(tiny_llama, num_kv_blocks=128, max_model_len=256,
                         enable_prefix_caching=False).generate(prompts, GREEDY))
    spec = llm(tiny_llama)
    got = tokens_of(generate_checked(spec, prompts[:1], GREEDY)) + tokens_of(
        generate_checked(spec, prompts[1:], GREEDY))
    assert got == want
    assert spec.engine.stats().prefix_cache_hits >= 3 * 2
    again = generate_checked(spec, prompts[:1], GREEDY)[0]  # generated blocks are cached too
    assert again.outputs[0].token_ids == want[0] and again.num_cached_tokens >= 32


def test_stops_max_tokens_min_tokens_penalties_and_logprobs_as_without(tiny_llama, baseline):
    stop_at = baseline[0][5]
    cases = [
        SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at]),
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at], min_tokens=9),
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, repetition_penalty=1.3,
                       frequency_penalty=0.4, presence_penalty=0.2),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3),
    ]
    prompts = [PROMPTS[0]] * len(cases)
    plain = LLM(tiny_llama, num_kv_blocks=128, max_model_len=256).generate(prompts, cases)
    spec = llm(tiny_llama)
    got = generate_checked(spec, prompts, cases)
    for g, w in zip(got, plain):
        a, b = g.outputs[0], w.outputs[0]
        assert (a.token_ids, a.finish_reason, a.stop_reason) == (b.token_ids, b.finish_reason, b.stop_reason)
    assert len(got[0].outputs[0].token_ids) == 7
    assert got[1].outputs[0].token_ids[-1] == stop_at and len(got[1].outputs[0].token_ids) <= 6
    lp, want_lp = got[-1].outputs[0].logprobs, plain[-1].outputs[0].logprobs
    assert len(lp) == 12 and [sorted(d) for d in lp] == [sorted(d) for d in want_lp]
    for d, w in zip(lp, want_lp):
        assert all(abs(d[t] - w[t]) < 1e-4 for t in w)
    assert abs(got[-1].outputs[0].cumulative_logprob - plain[-1].outputs[0].cumulative_logprob) < 1e-3
    assert sum(o.num_accepted_tokens for o in got) > 0


def test_seeded_sampling_is_reproducible_and_matches_no_speculation(tiny_llama):
    """A point-mass draft is verified with the sampler's own noise: a seeded request draws the
    same tokens as without speculation, whatever runs beside it."""
    seeded = SamplingParams(max_tokens=20, temperature=0.7, top_k=3, seed=99, ignore_eos=True,
                            repetition_penalty=1.1)
    prompt = PROMPTS[1]
    want = LLM(tiny_llama, num_kv_blocks=128, max_model_len=256).generate([prompt], seeded)[0].outputs[0].token_ids
    spec = llm(tiny_llama)
    alone = generate_checked(spec, [prompt], seeded)[0]
    others = [SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)] * 3
    crowded = generate_checked(spec, PROMPTS[2:5] + [prompt], others + [seeded])[-1]
    assert alone.outputs[0].token_ids == want == crowded.outputs[0].token_ids
    assert alone.num_draft_tokens > 0


def test_above_the_batch_size_threshold_nothing_is_drafted(tiny_llama, baseline):
    spec = llm(tiny_llama, spec={**NGRAM, "disable_above_batch_size": 2})
    outs = generate_checked(spec, PROMPTS, GREEDY)
    assert tokens_of(outs) == baseline
    # six sequences run together until the shortest finish: no drafts while more than 2 run
    steps = spec.engine.scheduler.spec_stats.num_drafts
    alone = llm(tiny_llama)
    generate_checked(alone, PROMPTS, GREEDY)
    assert steps < alone.engine.scheduler.spec_stats.num_drafts


@pytest.mark.parametrize("threshold", [3, 32])
def test_the_overlapped_loop_hands_over_to_synchronous_speculation(tiny_llama, baseline, threshold):
    """With async scheduling, steps above the threshold overlap and draft nothing; at or below
    it, steps run synchronously and verify drafts."""
    spec = llm(tiny_llama, spec={**NGRAM, "disable_above_batch_size": threshold}, async_scheduling=True)
    short = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    params = [GREEDY, GREEDY] + [short] * (len(PROMPTS) - 2)  # the repeating prompts run on alone
    got = tokens_of(generate_checked(spec, PROMPTS, params))
    assert got == baseline[:2] + [b[:6] for b in baseline[2:]]
    assert spec.engine.scheduler.spec_stats.num_accepted_tokens > 0


def _overlapped_share(engine, prompts, params) -> tuple[list, float]:
    """Run prompts to the end, checking the pool after every step; also the share of steps that
    left a step in flight (overlapped) rather than running synchronously."""
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, replace(params, output_kind=OutputKind.FINAL_ONLY))
    done, steps, overlapped = {}, 0, 0
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
        steps += 1
        overlapped += engine._inflight is not None
        engine.block_manager.check_integrity([b for s in engine.scheduler.running for b in s.block_table])
    assert sorted(done) == sorted(map(str, range(len(prompts)))), "a finished request's output was lost"
    return [done[str(i)].outputs[0].token_ids for i in range(len(prompts))], overlapped / steps


def test_n_gram_overlaps_the_steps_where_it_has_nothing_to_draft(tiny_llama, baseline):
    """Where the tokens do not repeat, n-gram speculation leaves the loop overlapped (it looks up
    the tokens known one step behind); where they do, it turns synchronous and verifies drafts.
    The hand-overs lose nothing: a request finishing in the step still in flight when the loop
    turns synchronous gets its output (it was dropped before)."""
    spec = llm(tiny_llama, spec={**NGRAM, "disable_when_slower": False, "prompt_lookup_min": 4,
                                 "prompt_lookup_max": 4}, async_scheduling=True)
    random_tokens, share = _overlapped_share(spec.engine, PROMPTS[2:], GREEDY)
    assert random_tokens == baseline[2:]
    assert share > 0.5, share  # a draft model (every step synchronous) would be at 0
    drafts = spec.engine.scheduler.spec_stats.num_drafts
    repeating, _ = _overlapped_share(spec.engine, PROMPTS[:1], GREEDY)
    assert repeating == baseline[:1]
    stats = spec.engine.scheduler.spec_stats
    assert stats.num_drafts > drafts and stats.num_accepted_tokens > 0


def test_arrivals_above_the_threshold_after_drafting_change_nothing(tiny_llama, baseline):
    """Requests arriving while one request speculates push the batch above the threshold: drafting
    stops, the loop overlaps again, and no output changes."""
    spec = llm(tiny_llama, spec={**NGRAM, "disable_above_batch_size": 2}, async_scheduling=True)
    engine = spec.engine
    engine.add_request("0", PROMPTS[0], GREEDY)
    done = {}
    while engine.scheduler.spec_stats.num_drafts < 2:
        done.update({o.request_id: o for o in engine.step() if o.finished})
    drafts = engine.scheduler.spec_stats.num_drafts
    for i, p in enumerate(PROMPTS[1:], 1):
        engine.add_request(str(i), p, GREEDY)
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
        engine.block_manager.check_integrity([b for s in engine.scheduler.running for b in s.block_table])
    assert [done[str(i)].outputs[0].token_ids for i in range(len(PROMPTS))] == baseline
    assert engine.scheduler.spec_stats.num_drafts <= drafts + 1  # nothing drafted above the threshold


def test_a_resumed_request_continues_exactly(tiny_llama, baseline):
    """Resume after a lost executor (prior output tokens given): speculation picks up from them."""
    engine = llm(tiny_llama).engine
    for i, (p, want) in enumerate(zip(PROMPTS[:2], baseline)):
        engine.add_request(f"r{i}", p, GREEDY, prior_output_token_ids=want[:9])
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert [done[f"r{i}"].outputs[0].token_ids for i in range(2)] == [w[9:] for w in baseline[:2]]
    assert sum(done[f"r{i}"].num_accepted_tokens for i in range(2)) > 0


def test_n_samples_fork_and_speculate_each(tiny_llama, baseline):
    spec = llm(tiny_llama)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, n=2)
    outs = generate_checked(spec, PROMPTS[:2], params)
    assert [[c.token_ids for c in o.outputs] for o in outs] == [[b, b] for b in baseline[:2]]
    assert all(o.num_accepted_tokens > 0 for o in outs)
    sampled = SamplingParams(max_tokens=16, temperature=0.9, seed=3, ignore_eos=True, n=2)
    want = LLM(tiny_llama, num_kv_blocks=128, max_model_len=256).generate(PROMPTS[:2], sampled)
    got = generate_checked(spec, PROMPTS[:2], sampled)
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
    assert spec.engine.stats().num_free_blocks == 128
