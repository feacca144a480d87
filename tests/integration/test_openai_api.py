"""The OpenAI-compatible HTTP API of the gateway, driven with the official `openai` client against
the full stack (tiny real model, byte tokenizer): completions and chat, streaming and not, n,
logprobs, stop, vLLM's extras, errors in OpenAI's shape with their status, API keys, and a client
that disconnects (its request aborted). Tokens equal LLM.generate's."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from services.tokenizer.config import TokenizerConfig
from services.tokenizer.core import load_core
from services.tokenizer.fake import ByteTokenizer
from tests.integration.svc_stack import real_engine, wait_for

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(300)
KEY = "sk-test-openai"
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def reference(byte_llama):
    from gpu_engine.llm import LLM

    return LLM(model=byte_llama, device="cpu", dtype="float32")


def want(reference, ids, **params):
    from gpu_engine.sampling_params import SamplingParams

    return reference.generate([list(ids)], SamplingParams(**params))[0]


@pytest.fixture
def served(stack_factory, byte_llama):
    stack = stack_factory(executors=0, gateway_options={"api_keys": f"tester:{KEY}",
                                                        "openai_port": 0})
    engine = real_engine(byte_llama)
    aborted: list[str] = []
    abort = engine.abort_request
    engine.abort_request = lambda ids: (aborted.extend([ids] if isinstance(ids, str) else ids),
                                        abort(ids))[1]
    stack.add_executor(engine=engine)
    stack.wait_executors(1)
    stack.aborted = aborted
    stack.base = f"http://127.0.0.1:{stack.gateway.http.port}"
    stack.client = openai.OpenAI(base_url=stack.base + "/v1", api_key=KEY, max_retries=0,
                                 timeout=60)
    return stack


def test_completions_equal_llm_generate(served, reference):
    prompt = "The capital of France is"
    ref = want(reference, TOK.encode(prompt), max_tokens=10, temperature=0.0)
    text = TOK.decode(ref.outputs[0].token_ids)
    r = served.client.completions.create(model="fake-bytes", prompt=prompt, max_tokens=10,
                                         temperature=0)
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.prompt_token_ids), 10)
    assert r.object == "text_completion" and r.model == "fake-bytes"
    stream = served.client.completions.create(model="fake-bytes", prompt=prompt, max_tokens=10,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    ids = [5, 77, 130, 41, 9]  # a token-id prompt, vLLM's extras through extra_body
    ref = want(reference, ids, max_tokens=6, min_tokens=6, ignore_eos=True, temperature=0.0)
    r = served.client.completions.create(model="fake-bytes", prompt=ids, max_tokens=6,
                                         temperature=0,
                                         extra_body={"ignore_eos": True, "min_tokens": 6})
    assert r.choices[0].text == TOK.decode(ref.outputs[0].token_ids)
    assert r.usage.completion_tokens == 6


def test_chat_equal_llm_generate(served, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi!"}]
    ids, _ = load_core(TokenizerConfig(fake_engine=True)).tokenize(messages=messages)
    ref = want(reference, ids, max_tokens=8, temperature=0.0)
    text = TOK.decode(ref.outputs[0].token_ids)
    r = served.client.chat.completions.create(model="fake-bytes", messages=messages,
                                              max_completion_tokens=8, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.usage.completion_tokens == 8
    chunks = list(served.client.chat.completions.create(
        model="fake-bytes", messages=messages, max_tokens=8, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_n_and_seeded_sampling_equal_llm_generate(served, reference):
    prompt = "Once upon a time"
    params = dict(n=2, max_tokens=8, temperature=0.8, top_p=0.9, seed=42, presence_penalty=0.3)
    ref = want(reference, TOK.encode(prompt), top_k=30, **params)
    texts = [TOK.decode(o.token_ids) for o in ref.outputs]
    r = served.client.completions.create(model="fake-bytes", prompt=prompt, **params,
                                         extra_body={"top_k": 30})
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == texts
    assert r.usage.completion_tokens == 16
    got = {0: "", 1: ""}
    for c in served.client.completions.create(model="fake-bytes", prompt=prompt, stream=True,
                                              **params, extra_body={"top_k": 30}):
        for choice in c.choices:
            got[choice.index] += choice.text
    assert [got[0], got[1]] == texts


def test_logprobs_and_stop(served, reference):
    prompt = "abcabcabc"
    ref = want(reference, TOK.encode(prompt), max_tokens=6, temperature=0.0, logprobs=2)
    out = ref.outputs[0]
    r = served.client.completions.create(model="fake-bytes", prompt=prompt, max_tokens=6,
                                         temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == [TOK.decode([t]) for t in out.token_ids]
    assert lp.token_logprobs == pytest.approx([d[t] for d, t in zip(out.logprobs, out.token_ids)],
                                              abs=1e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    r = served.client.chat.completions.create(model="fake-bytes", max_tokens=6, temperature=0,
                                              messages=[{"role": "user", "content": prompt}],
                                              logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and all(len(e.top_logprobs) == 2 for e in content)
    assert "".join(e.token for e in content) == r.choices[0].message.content
    text = TOK.decode(out.token_ids)
    stop = text[2:4]
    r = served.client.completions.create(model="fake-bytes", prompt=prompt, max_tokens=6,
                                         temperature=0, stop=[stop])
    assert r.choices[0].text == text[:2] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop


def test_errors_have_openai_shape_and_status(served):
    with pytest.raises(openai.BadRequestError) as err:
        served.client.completions.create(model="fake-bytes", prompt="x", temperature=-1)
    assert err.value.status_code == 400
    assert err.value.body["param"] == "temperature"
    assert "temperature must be >= 0" in err.value.body["message"]
    assert err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        served.client.chat.completions.create(model="fake-bytes", messages=[])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="exceeds the context length"):
        served.client.completions.create(model="fake-bytes", prompt="x", max_tokens=100_000)
    wrong = openai.OpenAI(base_url=served.base + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.completions.create(model="fake-bytes", prompt="x")
    assert err.value.status_code == 401 and "sk-wrong" not in str(err.value.body)
    with pytest.raises(openai.NotFoundError) as err:
        served.client.completions.create(model="gpt-5", prompt="x")
    assert err.value.body["code"] == "model_not_found"
    models = served.client.models.list()
    assert [m.id for m in models.data] == ["fake-bytes"]
    with urllib.request.urlopen(served.base + "/health", timeout=5) as resp:
        assert resp.status == 200
    req = urllib.request.Request(served.base + "/v1/completions", data=b"{not json",
                                 headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(req, timeout=5)
    body = json.loads(http_err.value.read())
    assert http_err.value.code == 400 and "not valid JSON" in body["error"]["message"]


def test_client_disconnect_aborts_the_request(served):
    stream = served.client.completions.create(model="fake-bytes", prompt="a long story",
                                              max_tokens=400, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the HTTP connection goes away mid-stream
    wait_for(lambda: served.aborted, 10, "the engine to abort the request")
    served.wait_idle(10)
    assert served.gateway.core.active == 0 and served.gateway.gate.busy == 0
