"""The prefill and mixed steps' graph pieces (gpu_engine/mixed_graphs.py), run eagerly on the CPU:
the same forward as the model's, through static buffers and padded rows. The capture itself is
the GPU's (tests/gpu/test_gpu_engine.py runs every engine test with the pieces captured)."""

import pytest
import torch

from gpu_engine.config import MAX_MIXED_GRAPH_TOKENS, EngineConfig
from gpu_engine.mixed_graphs import MixedGraphs, mixed_token_ladder
from taxiway import LLM, SamplingParams
from tests.engine.hf import random_prompts


@pytest.mark.parametrize("max_tokens", [1, 16, 17, 100, 1000, 2048, 8192])
def test_the_ladder_pads_little_and_tops_out_at_the_budget(max_tokens):
    sizes = mixed_token_ladder(max_tokens)
    top = min(max_tokens, MAX_MIXED_GRAPH_TOKENS)
    assert sizes == sorted(set(sizes)) and sizes[-1] == top
    for n in range(1, top + 1):
        pad = next(s for s in sizes if s >= n) - n
        assert pad < (32 if n <= 256 else 64 if n <= 1024 else 128), (n, pad)


def _engine(path: str, pieces: bool, **settings) -> LLM:
    llm = LLM(path, device="cpu", dtype="float32", **settings)
    runner = llm.engine.runner
    assert runner.mixed_graphs is None  # nothing is captured on the CPU
    if pieces:  # no graphs captured: run() runs each piece eagerly
        runner.mixed_graphs = MixedGraphs(runner, llm.engine.max_num_batched_tokens)
    return llm


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_greedy_tokens_and_logprobs_equal_the_eager_forward(arch, tiny_checkpoints):
    """Prefills of 1 to 130 tokens, chunked at 48 tokens beside decodes: every non-decode step
    through the pieces, padded to the ladder, with preemptions on the way (a 20-block pool)."""
    prompts = random_prompts(10, 320, seed=5, lengths=[1, 2, 15, 16, 17, 33, 64, 100, 130, 47])
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    settings = {"num_kv_blocks": 20, "max_model_len": 256, "max_num_batched_tokens": 48, "max_num_seqs": 6}
    want = _engine(tiny_checkpoints[arch], False, **settings).generate(prompts, params)
    llm = _engine(tiny_checkpoints[arch], True, **settings)
    calls = []
    run = llm.engine.runner.mixed_graphs.run
    llm.engine.runner.mixed_graphs.run = lambda layout: calls.append(layout.num_tokens) or run(layout)
    got = llm.generate(prompts, params)
    assert calls and max(calls) == 48 and min(calls) < 48
    assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.block_manager.check_integrity()
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert a.keys() == b.keys()
            assert max(abs(a[k] - b[k]) for k in a) < 1e-4
        for a, b in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]):
            assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-4


def test_eagle3_drafts_from_the_same_residual_streams_through_the_pieces(tiny_llama, eagle_head):
    """EAGLE-3 drafts from the residual streams entering its aux layers: through the pieces they
    are copied into a static buffer. Step by step they equal the eager forward's (on the CPU every
    step that fits the ladder takes the pieces, decodes and verify steps too), and so do the
    outputs and the drafts accepted; chunked prefill beside decodes included."""
    from tests.engine.spec_helpers import ALWAYS

    prompts = random_prompts(6, 320, seed=7, lengths=[3, 17, 40, 64, 9, 100])
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    spec = {"method": "eagle3", "num_speculative_tokens": 3, "model": eagle_head, **ALWAYS}
    settings = {"num_kv_blocks": 64, "max_model_len": 256, "max_num_batched_tokens": 48,
                "speculative_config": spec}
    runs = []
    for pieces in (False, True):
        llm = _engine(tiny_llama, pieces, **settings)
        runner, streams = llm.engine.runner, []
        assert runner.aux_layers
        owner, name = (runner.mixed_graphs, "run") if pieces else (runner.model, "forward_aux")
        original = getattr(owner, name)

        def keep(*args, original=original, streams=streams, **kw):
            out = original(*args, **kw)
            streams.append(out[-1])
            return out

        setattr(owner, name, keep)
        outs = llm.generate(prompts, params)
        llm.engine.block_manager.check_integrity()
        stats = llm.engine.scheduler.spec_stats
        runs.append(([o.outputs[0].token_ids for o in outs], stats.num_draft_tokens, stats.num_accepted_tokens,
                     streams))
    (want, drafted, accepted, eager), (got, drafted_p, accepted_p, replayed) = runs
    assert got == want and (drafted_p, accepted_p) == (drafted, accepted) and drafted > 0
    assert len(replayed) == len(eager) > len(prompts)
    for a, b in zip(replayed, eager):
        assert a.shape == b.shape == (a.shape[0], len(llm.engine.runner.aux_layers) * 64)
        assert torch.allclose(a, b, atol=1e-5)


def test_padding_rows_write_no_kv_and_leave_the_cache_as_the_eager_forward_does(tiny_llama):
    """One 5-token prefill padded to 16 rows: the cache afterwards equals the eager step's (the
    11 padding rows wrote nowhere), and so does the hidden state of the real rows."""
    settings = {"num_kv_blocks": 8, "max_model_len": 64}
    prompt = random_prompts(1, 320, seed=9, lengths=[5])
    params = SamplingParams(max_tokens=1, temperature=0.0)
    caches = []
    for pieces in (False, True):
        llm = _engine(tiny_llama, pieces, **settings)
        for k, v in llm.engine.runner.kv_caches:
            k.fill_(7.0)
            v.fill_(7.0)
        llm.generate(prompt, params)
        caches.append(torch.stack([torch.stack(kv) for kv in llm.engine.runner.kv_caches]))
    assert mixed_token_ladder(settings["max_model_len"])[0] == 16
    assert torch.allclose(caches[0], caches[1], atol=1e-5)
    assert int((caches[1] != 7.0).any(dim=-1).sum()) == 2 * 2 * 2 * 5  # layers x K/V x heads x tokens


@pytest.mark.parametrize("bad", [-1, MAX_MIXED_GRAPH_TOKENS + 1, 1.5, True, None])
def test_max_mixed_graph_tokens_outside_its_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"max_mixed_graph_tokens must be an integer in \[0, 2048\], got"):
        EngineConfig(max_mixed_graph_tokens=bad)
