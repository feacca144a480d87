"""Speculation on the default model (SmolLM2-135M-Instruct, float32, CPU): as its own draft it
accepts every draft; greedy text and tokens equal no speculation; stop strings that complete inside
an accepted run cut the output there, streamed and final; n-gram on prompts that repeat their input."""

import pytest

from taxiway import LLM, OutputKind, SamplingParams
from tests.engine.spec_helpers import ALWAYS

pytest.importorskip("transformers")

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Summarise: The committee met on Monday. The committee agreed the budget. The committee will meet "
    "again on Friday. Summary: The committee",
    "List three colours:",
]
PLAIN = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(default_model_dir):
    return LLM(str(default_model_dir), max_model_len=512, num_kv_blocks=96)


@pytest.fixture(scope="module")
def self_draft(default_model_dir):
    return LLM(str(default_model_dir), max_model_len=512, num_kv_blocks=96, speculative_config={
        "method": "draft_model", "num_speculative_tokens": 4, "model": str(default_model_dir), **ALWAYS})


def test_the_default_model_as_its_own_draft_accepts_everything(plain, self_draft):
    want = plain.generate(PROMPTS[:2], PLAIN)
    got = self_draft.generate(PROMPTS[:2], PLAIN)
    for g, w in zip(got, want):
        assert (g.outputs[0].token_ids, g.outputs[0].text) == (w.outputs[0].token_ids, w.outputs[0].text)
        assert g.num_draft_tokens > 0 and g.num_accepted_tokens == g.num_draft_tokens


def test_stop_strings_inside_accepted_runs_cut_the_output_there(plain, self_draft):
    full = plain.generate(PROMPTS[0], PLAIN)[0].outputs[0].text
    for start in (len(full) // 4, len(full) // 2):
        stop = full[start : start + 5]
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop], logprobs=1)
        want = plain.generate(PROMPTS[0], params)[0].outputs[0]
        got = self_draft.generate(PROMPTS[0], params)[0].outputs[0]
        assert (got.text, got.token_ids, got.stop_reason) == (want.text, want.token_ids, stop)
        assert len(got.logprobs) == len(got.token_ids)
        assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-3)
        engine = self_draft.engine
        engine.add_request("s", PROMPTS[0], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                                                           stop=[stop], output_kind=OutputKind.DELTA))
        pieces, tokens = [], []
        while engine.has_unfinished_requests():
            for out in engine.step():
                pieces.append(out.outputs[0].text)
                tokens += out.outputs[0].token_ids
        assert "".join(pieces) == want.text and tokens == want.token_ids
        engine.block_manager.check_integrity()


def test_ngram_on_prompts_that_repeat_their_input(default_model_dir, plain):
    llm = LLM(str(default_model_dir), max_model_len=512, num_kv_blocks=96, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, **ALWAYS})
    want = plain.generate(PROMPTS, PLAIN)
    got = llm.generate(PROMPTS, PLAIN)
    assert [g.outputs[0].text for g in got] == [w.outputs[0].text for w in want]
    assert sum(g.num_accepted_tokens for g in got[:2]) > 0
