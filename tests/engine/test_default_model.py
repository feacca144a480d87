"""The default model (SmolLM2-135M-Instruct, float32, CPU) against HF transformers, and text features."""

import pytest
import torch

from taxiway import LLM, OutputKind, SamplingParams
from tests.engine.hf import hf_greedy

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "List three colours:",
    "1, 2, 3, 4, 5,",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Translate to French: I like apples because they are sweet and crunchy. Answer:",
    "In 1969, Apollo 11",
    "Water boils at",
    "Here is a long story about a robot who learns to paint. It starts in a small workshop where the "
    "robot sweeps the floor every day, watching the old painter mix colours on a wooden palette.",
]
MAX_NEW = 12


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(str(default_model_dir), max_model_len=2048)


@pytest.fixture(scope="module")
def hf(default_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    return model, tok


@pytest.fixture(scope="module")
def hf_refs(hf):
    model, tok = hf
    return [hf_greedy(model, tok(p).input_ids, MAX_NEW) for p in PROMPTS]


def test_tokenization_matches_hf(llm, hf):
    _, tok = hf
    for p in PROMPTS:
        assert llm.get_tokenizer().encode(p) == tok(p).input_ids


def test_batched_greedy_and_logprobs_equal_hf(llm, hf_refs):
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=0)
    outs = llm.generate(PROMPTS, params)
    for out, (want, want_lps) in zip(outs, hf_refs):
        got = out.outputs[0]
        assert got.token_ids == want
        assert max(abs(lp[t] - w) for lp, t, w in zip(got.logprobs, got.token_ids, want_lps)) < 1e-4


def test_one_at_a_time_equals_hf(llm, hf_refs):
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    for prompt, (want, _) in zip(PROMPTS, hf_refs):
        assert llm.generate(prompt, params)[0].outputs[0].token_ids == want


def test_text_is_the_decoded_tokens(llm, hf):
    _, tok = hf
    out = llm.generate(PROMPTS[3], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0].outputs[0]
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)


def test_chat_answers_the_capital_of_france(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=32, temperature=0.0))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended on the model's end-of-turn token


def test_stop_string_ends_the_output_before_it(llm):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    full = llm.chat(chat, SamplingParams(max_tokens=32, temperature=0.0))[0].outputs[0].text
    cut = llm.chat(chat, SamplingParams(max_tokens=32, temperature=0.0, stop=["Paris"]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == "Paris"
    assert cut.text == full[: full.index("Paris")]
    kept = llm.chat(chat, SamplingParams(max_tokens=32, temperature=0.0, stop=["Paris"],
                                         include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == full[: full.index("Paris") + len("Paris")]


def test_streamed_text_adds_up_and_never_shows_a_stop_prefix(llm):
    engine = llm.engine
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    full = llm.generate(PROMPTS[6], plain)[0].outputs[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 7]  # spans a token boundary somewhere in the middle
    final = llm.generate(PROMPTS[6], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                    stop=[stop]))[0].outputs[0]
    assert final.stop_reason == stop and final.text == full[: full.index(stop)]
    engine.add_request("stream", PROMPTS[6], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                            stop=[stop], output_kind=OutputKind.DELTA))
    pieces = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.outputs[0].text)
            assert not any(stop.startswith(("".join(pieces))[i:]) for i in range(len("".join(pieces))))
    assert "".join(pieces) == final.text
