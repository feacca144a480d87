"""OpenAI request bodies to GenerateInput (vLLM's extras included), and every bad field refused
with its name, the value and what was expected (the `param` of OpenAI's error shape)."""

from __future__ import annotations

import pytest

from services.gateway.openai.body import BadParam
from services.gateway.openai.errors import ModelNotFound, error_body
from services.gateway.openai.protocol import parse_chat, parse_completion


def test_completion_fields_map_to_sampling_params():
    call = parse_completion({"model": "m", "prompt": [5, 6, 7], "max_tokens": 9, "n": 2,
                             "temperature": 0.5, "top_p": 0.9, "top_k": 4, "min_p": 0.1,
                             "repetition_penalty": 1.1, "presence_penalty": 0.2,
                             "frequency_penalty": -0.3, "seed": 11, "stop": "END",
                             "ignore_eos": True, "min_tokens": 3, "logprobs": 2,
                             "stream": True, "stream_options": {"include_usage": True}})
    p = call.inp.params
    assert call.inp.token_ids == (5, 6, 7) and not call.chat and call.stream and call.include_usage
    assert (p.max_tokens, p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (9, 2, 0.5, 0.9, 4, 0.1)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.1, 0.2, -0.3)
    assert (p.seed, p.stop, p.ignore_eos, p.min_tokens, p.logprobs) == (11, ("END",), True, 3, 2)
    assert call.top_logprobs == 2
    assert parse_completion({"prompt": ["one"]}).inp.text == "one"  # a batch of one
    assert parse_completion({"prompt": "x"}).inp.params.max_tokens == 16  # OpenAI's default


def test_chat_fields():
    call = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}],
                       "max_tokens": 5, "max_completion_tokens": 7, "logprobs": True,
                       "top_logprobs": 3})
    assert call.chat and call.inp.messages == [{"role": "user", "content": "ab"}]
    assert call.inp.params.max_tokens == 7 and call.top_logprobs == 3 and call.inp.params.logprobs == 3
    assert parse_chat({"messages": [{"role": "user", "content": "x"}]}).inp.params.max_tokens is None


@pytest.mark.parametrize("parse, body, param, message", [
    (parse_completion, {"prompt": "x", "temperature": "hot"}, "temperature", "must be a finite number, got 'hot'"),
    (parse_completion, {"prompt": "x", "temperature": -1}, "temperature", "temperature must be >= 0"),
    (parse_completion, {"prompt": "x", "max_tokens": 0}, "max_tokens", "at least 1, got 0"),
    (parse_completion, {"prompt": "x", "n": 500}, "n", "n must be at least 1 and at most 128"),
    (parse_completion, {"prompt": "x", "logprobs": 21}, "logprobs", "between 0 and 20, got 21"),
    (parse_completion, {"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    (parse_completion, {"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias", "not supported"),
    (parse_completion, {"prompt": "x", "stop": [1]}, "stop", "a string or a list of strings"),
    (parse_completion, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options",
     "only allowed with stream: true"),
    (parse_chat, {"messages": []}, "messages", "non-empty list"),
    (parse_chat, {"messages": [{"content": "x"}]}, "messages[0]", "an object with a role"),
    (parse_chat, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", "only text parts"),
    (parse_chat, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs", "needs logprobs: true"),
])
def test_bad_fields_name_themselves(parse, body, param, message):
    with pytest.raises(BadParam) as err:
        parse(body)
    assert err.value.param == param and message in str(err.value), str(err.value)
    status, shape = error_body(err.value)
    assert status == 400 and shape["error"]["param"] == param
    assert shape["error"]["type"] == "invalid_request_error"


def test_error_statuses():
    from gpu_engine.errors import NotReady, Overloaded
    from services.common.errors import Unauthenticated

    assert error_body(ModelNotFound("gpt", "m"))[0] == 404
    assert error_body(Unauthenticated("no"))[0] == 401
    assert error_body(Overloaded("full"))[0] == 429
    assert error_body(NotReady("draining"))[0] == 503
    status, shape = error_body(RuntimeError("boom"))
    assert status == 500 and shape["error"]["message"] == "internal error: RuntimeError: boom"
