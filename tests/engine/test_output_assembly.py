"""Output assembly does only what is due: a FINAL_ONLY request is decoded once when it finishes
(same text as streaming it), streamed requests are decoded token by token, and stop strings still
cut the text (they need the text of every step)."""

import pytest

from taxiway import LLM, OutputKind, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three colours:", "1, 2, 3, 4, 5,"]


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(str(default_model_dir), max_model_len=1024)


def count_decodes(llm, monkeypatch):
    calls = []
    decode = llm.engine.tokenizer.decode
    monkeypatch.setattr(llm.engine.tokenizer, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    return calls


def stream_final_texts(engine, params):
    for i, (p, sp) in enumerate(zip(PROMPTS, params)):
        engine.add_request(f"s{i}", p, sp)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0]
    return [finals[f"s{i}"] for i in range(len(PROMPTS))]


def test_final_only_text_is_decoded_once_and_equals_the_streamed_text(llm, monkeypatch):
    params = [SamplingParams(max_tokens=12, temperature=0.0, **extra)
              for extra in ({}, {"stop_token_ids": (13,)}, {"skip_special_tokens": False}, {"min_tokens": 3})]
    streamed = stream_final_texts(llm.engine, params)  # CUMULATIVE: text built every step
    calls = count_decodes(llm, monkeypatch)
    finals = [o.outputs[0] for o in llm.generate(PROMPTS, params)]  # FINAL_ONLY
    assert [f.text for f in finals] == [s.text for s in streamed]
    assert [f.token_ids for f in finals] == [s.token_ids for s in streamed]
    assert [f.finish_reason for f in finals] == [s.finish_reason for s in streamed]
    assert len(calls) <= 3 * len(PROMPTS)  # a few decodes per request, not one per token


def test_stop_strings_still_cut_a_final_only_output(llm):
    params = SamplingParams(max_tokens=10, temperature=0.0)
    free = llm.generate(PROMPTS[0], params)[0].outputs[0].text
    stop = free.split()[1]
    cut = llm.generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0.0, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == free[: free.index(stop)]


def test_a_final_only_request_reports_nothing_until_it_finishes(llm):
    engine = llm.engine
    engine.add_request("quiet", PROMPTS[1], SamplingParams(max_tokens=5, temperature=0.0,
                                                           output_kind=OutputKind.FINAL_ONLY))
    outs = []
    while engine.has_unfinished_requests():
        outs.append(engine.step())
    assert all(not o for o in outs[:-1]) and len(outs[-1]) == 1 and outs[-1][0].finished
    assert {"arrival", "first_scheduled", "first_token", "finished"} <= set(outs[-1][0].metrics)
