"""The speculation gate inside the engine: it is told every decode step's mode, tokens and time;
steps it turns speculation off for verify nothing and draft nothing; outputs never change; a draft
that only costs is turned off on its own."""

from taxiway import LLM, SamplingParams
from tests.engine.spec_helpers import NGRAM, generate_checked, tokens_of

PARAMS = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
PROMPT = [5, 9, 17, 3, 5, 9, 17, 3, 5, 9, 17, 3, 5, 9]  # repeats itself: n-gram drafts every step


class ScriptedGate:
    """Speculates for `period` observed steps, then not for `period`, and so on; records what the
    engine reports."""

    def __init__(self, period: int):
        self.period, self.seen = period, []

    def speculate(self, num_seqs: int) -> bool:
        return (len(self.seen) // self.period) % 2 == 0

    def observe(self, num_seqs: int, speculated: bool, tokens: int, seconds: float) -> None:
        self.seen.append((num_seqs, speculated, tokens, seconds))


def gated_llm(path, spec, gate=None):
    llm = LLM(path, num_kv_blocks=128, max_model_len=256, speculative_config=spec)
    if gate is not None:
        llm.engine.spec.gate = gate
    return llm


def test_the_engine_reports_each_decode_step_and_obeys_the_gate(tiny_llama):
    want = tokens_of(LLM(tiny_llama, num_kv_blocks=128, max_model_len=256).generate([PROMPT], PARAMS))
    gate = ScriptedGate(period=4)
    llm = gated_llm(tiny_llama, {k: v for k, v in NGRAM.items() if k != "disable_when_slower"}, gate)
    drafts_per_step, final = [], []
    engine = llm.engine
    engine.add_request("r", PROMPT, PARAMS)
    while engine.has_unfinished_requests():
        before = engine.scheduler.spec_stats.num_drafts
        final += [o for o in engine.step() if o.finished]
        drafts_per_step.append(engine.scheduler.spec_stats.num_drafts - before)
    assert tokens_of(final) == want
    # switching every 3 steps keeps the output and the block pool's integrity after every step
    assert tokens_of(generate_checked(gated_llm(tiny_llama, NGRAM, ScriptedGate(3)), [PROMPT], PARAMS)) == want
    # every step after the prompt's is a decode step, so the gate saw every token but the first
    assert len(gate.seen) == len(drafts_per_step) - 1
    assert sum(tokens for _, _, tokens, _ in gate.seen) == PARAMS.max_tokens - 1
    assert all(n == 1 and seconds > 0 for n, _, _, seconds in gate.seen)
    modes = [speculated for _, speculated, _, _ in gate.seen]
    assert True in modes and False in modes
    for i, (speculated, drafts) in enumerate(zip(modes, drafts_per_step[1:])):
        if not speculated and drafts:  # a verify right after the gate turned speculation off
            assert i > 0 and modes[i - 1], "drafts were proposed in a step the gate had turned off"
    assert sum(drafts_per_step) > 0


def test_a_draft_that_only_costs_is_turned_off_and_changes_nothing(tiny_llama, tiny_checkpoints):
    params = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    want = tokens_of(LLM(tiny_llama, num_kv_blocks=128, max_model_len=256).generate([PROMPT], params))
    llm = gated_llm(tiny_llama, {"method": "draft_model", "num_speculative_tokens": 4,
                                 "model": tiny_checkpoints["qwen2"]})
    assert tokens_of(llm.generate([PROMPT], params)) == want
    summary = llm.engine.spec.gate.summary()["1"]
    # four draft forwards and a verify per step, for almost no accepted token: several times slower
    assert summary["plain_tokens_per_s"] > summary["spec_tokens_per_s"] > 0
    assert summary["speculating"] is False
