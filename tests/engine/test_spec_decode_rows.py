"""Verify steps as decode rows, the layout the decode CUDA graphs replay on a GPU: each of a verify
entry's 1 + k tokens is a row of its own that attends to its slot's positions up to its own. Run on
the CPU through the graphs' own forward (eagerly, no capture), greedy output stays token-identical
to no speculation, for n-gram, the target as its own draft and an EAGLE-3 head (whose residual
streams then come from that forward too), and verify steps did take that path."""

import pytest

from gpu_engine.cuda_graphs import DecodeGraphs
from taxiway import LLM, SamplingParams
from tests.engine.hf import random_prompts
from tests.engine.spec_helpers import ALWAYS, generate_checked, tokens_of

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 9, 17, 3, 88, 41, 7, 120] * 3, [200, 201, 202] * 6] + random_prompts(
    3, 320, seed=11, lengths=[4, 16, 29])


class EagerRows(DecodeGraphs):
    """DecodeGraphs that capture nothing: a replay runs the rows' forward eagerly with the reference
    ops, at the step's own size; records (rows, sequences, verify entries) of each step."""

    def __init__(self, runner, max_num_seqs: int):
        super().__init__(runner, max_num_seqs)
        self.steps: list[tuple[int, int, int]] = []

    def padded_size(self, batch: int) -> int | None:
        return batch if batch <= self.sizes[-1] else None

    def _replay(self, size: int):
        return self._forward(size, host_lists=True)

    def run(self, layout):
        self.steps.append((layout.num_tokens, len(layout.seq_slot), len(layout.verify)))
        return super().run(layout)


def rows_llm(path, spec, **kw):
    llm = LLM(path, num_kv_blocks=128, max_model_len=256, speculative_config=spec, **kw)
    llm.engine.runner.graphs = EagerRows(llm.engine.runner, llm.engine.max_num_seqs)
    return llm


@pytest.fixture(scope="module")
def baseline(tiny_llama):
    return tokens_of(LLM(tiny_llama, num_kv_blocks=128, max_model_len=256).generate(PROMPTS, GREEDY))


@pytest.mark.parametrize("method", ["ngram", "draft_model", "eagle3"])
def test_verify_steps_as_decode_rows_are_token_identical(tiny_llama, baseline, eagle_head, method):
    spec = {"method": method, "num_speculative_tokens": 3, **ALWAYS}
    if method == "ngram":
        spec.update(prompt_lookup_min=1, prompt_lookup_max=3)
    else:
        spec["model"] = tiny_llama if method == "draft_model" else eagle_head
    llm = rows_llm(tiny_llama, spec)
    outs = generate_checked(llm, PROMPTS, GREEDY)
    assert tokens_of(outs) == baseline
    steps = llm.engine.runner.graphs.steps
    verify_steps = [s for s in steps if s[2] > 0]
    assert verify_steps and any(rows > seqs for rows, seqs, _ in verify_steps), steps
    if method == "draft_model":  # the target as its own draft: every draft accepted
        assert all(o.num_accepted_tokens == o.num_draft_tokens > 0 for o in outs)
    alone = [tokens_of(generate_checked(llm, [p], GREEDY))[0] for p in PROMPTS[:2]]
    assert alone == baseline[:2]
