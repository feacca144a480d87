"""OpenAI's /v1/completions and /v1/chat/completions bodies to GatewayCore's GenerateInput, and
GatewayCore's chunks back to OpenAI's response and stream-chunk objects (vLLM's extras accepted:
top_k, min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids, skip_special_tokens,
include_stop_str_in_output)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from gpu_engine import limits
from gpu_engine.errors import InvalidRequest
from gpu_engine.sampling_params import SamplingParams
from services.gateway.core import Chunk, GenerateInput
from services.gateway.openai.body import BadParam, Body

TokenStrings = Callable[[Sequence[int]], Awaitable[list[str]]]
UNSUPPORTED = ("logit_bias", "suffix", "tools", "functions", "response_format", "best_of")
FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


@dataclass(frozen=True)
class Call:
    """A parsed request: what to generate, and how to answer."""

    chat: bool
    model: str | None
    inp: GenerateInput
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None
    """Report logprobs with this many alternatives (None: no logprobs)."""
    return_token_ids: bool = False
    """vLLM's extra: each choice also carries its token ids (`token_ids`)."""


def parse_completion(data) -> Call:
    b = Body(data)
    b.refuse(*UNSUPPORTED, "echo")
    prompt = b.raw("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        fields = {"text": prompt}
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        fields = {"token_ids": tuple(prompt)}
    else:
        raise BadParam("prompt", "prompt must be a string or a list of token ids (one prompt per "
                                 f"request), got {_short(prompt)}")
    top = b.int("logprobs", None, lo=0, hi=limits.MAX_LOGPROBS)
    params = _sampling(b, max_tokens=b.int("max_tokens", 16, lo=1), logprobs=top)
    return Call(False, b.str("model"), GenerateInput(params, **fields), *_stream(b), top,
                b.bool("return_token_ids"))


def parse_chat(data) -> Call:
    b = Body(data)
    b.refuse(*UNSUPPORTED, "tool_choice", "parallel_tool_calls")
    messages = b.raw("messages")
    if not isinstance(messages, list) or not messages:
        raise BadParam("messages", f"messages must be a non-empty list of chat turns, got "
                                   f"{_short(messages)}")
    turns = [_turn(m, i) for i, m in enumerate(messages)]
    top = None
    if b.bool("logprobs"):
        top = b.int("top_logprobs", 0, lo=0, hi=limits.MAX_LOGPROBS)
    elif b.has("top_logprobs"):
        raise BadParam("top_logprobs", "top_logprobs needs logprobs: true")
    max_tokens = b.int("max_completion_tokens", None, lo=1)
    if max_tokens is None:
        max_tokens = b.int("max_tokens", None, lo=1)
    params = _sampling(b, max_tokens=max_tokens, logprobs=top)
    return Call(True, b.str("model"), GenerateInput(params, messages=turns), *_stream(b), top,
                b.bool("return_token_ids"))


def _turn(message, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadParam(where, f"{where} must be an object with a role, got {_short(message)}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise BadParam(f"{where}.content", f"{where}.content: only text parts are "
                                                   f"supported, got {_short(part)}")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise BadParam(f"{where}.content", f"{where}.content must be a string or a list of text "
                                           f"parts, got {_short(content)}")
    return {"role": message["role"], "content": content}


def _stream(b: Body) -> tuple[bool, bool]:
    stream = b.bool("stream")
    options = b.raw("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadParam("stream_options", f"stream_options must be an object, got {_short(options)}")
    include = Body(options or {}).bool("include_usage")
    if include and not stream:
        raise BadParam("stream_options", "stream_options is only allowed with stream: true")
    return stream, include


def _sampling(b: Body, *, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    try:
        return SamplingParams(
            n=b.int("n", 1), max_tokens=max_tokens, min_tokens=b.int("min_tokens", 0),
            temperature=b.float("temperature", 1.0), top_p=b.float("top_p", 1.0),
            top_k=b.int("top_k", 0), min_p=b.float("min_p", 0.0),
            repetition_penalty=b.float("repetition_penalty", 1.0),
            presence_penalty=b.float("presence_penalty", 0.0),
            frequency_penalty=b.float("frequency_penalty", 0.0), seed=b.int("seed"),
            ignore_eos=b.bool("ignore_eos"), stop=b.strings("stop"),
            stop_token_ids=b.ints("stop_token_ids"),
            include_stop_str_in_output=b.bool("include_stop_str_in_output"),
            skip_special_tokens=b.bool("skip_special_tokens", True), logprobs=logprobs)
    except BadParam:
        raise
    except InvalidRequest as exc:  # SamplingParams' own checks name the field first
        name = str(exc).split(" ")[0]
        raise BadParam(name if name in b.data else None, str(exc)) from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- answers ---------------------------------------------------------------------------------------

@dataclass
class Choice:
    """What one sample streamed so far (for a non-streaming answer)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    """OpenAI-shaped logprob entries (chat), or (token, logprob, top) triples (completions)."""


class Answer:
    """Builds one call's response objects from its chunks."""

    def __init__(self, call: Call, request_id: str, created: int, model: str,
                 token_strings: TokenStrings):
        self.call = call
        self.id = ("chatcmpl-" if call.chat else "cmpl-") + request_id
        self.created = created
        self.model = model
        self.object = "chat.completion" if call.chat else "text_completion"
        self._strings = token_strings
        self.choices = {i: Choice(i) for i in range(call.inp.params.n)}
        self.prompt_tokens = self.cached_tokens = 0
        self._started: set[int] = set()

    async def add(self, chunk: Chunk) -> dict | None:
        """Records a chunk; returns its stream chunk object (None when it carries nothing)."""
        c = self.choices[chunk.index]
        c.text += chunk.text
        c.completion_tokens += len(chunk.token_ids)
        c.token_ids += chunk.token_ids
        if chunk.usage:
            self.prompt_tokens, _, self.cached_tokens = chunk.usage
        logprobs = await self._logprobs(chunk, len(c.text) - len(chunk.text))
        if logprobs:
            c.logprobs += logprobs
        if chunk.finish_reason:
            c.finish_reason = FINISH[chunk.finish_reason]
            c.stop_reason = _stop_reason(chunk.stop_reason)
        if not (chunk.token_ids or chunk.text or chunk.finish_reason
                or chunk.index not in self._started):
            return None  # new tokens go out at once, even while their text is held back
        return self._stream_chunk(chunk, c, logprobs)

    def _stream_chunk(self, chunk: Chunk, c: Choice, logprobs: list | None) -> dict:
        choice: dict = {"index": c.index}
        if self.call.chat:
            if c.index not in self._started:
                choice["delta"] = {"role": "assistant", "content": chunk.text}
            else:
                choice["delta"] = {"content": chunk.text} if chunk.text else {}
            choice["logprobs"] = {"content": logprobs} if logprobs else None
        else:
            choice["text"] = chunk.text
            choice["logprobs"] = _legacy(logprobs) if logprobs else None
        self._started.add(c.index)
        if self.call.return_token_ids:
            choice["token_ids"] = list(chunk.token_ids)
        choice["finish_reason"] = c.finish_reason if chunk.finish_reason else None
        if chunk.finish_reason:
            choice["stop_reason"] = c.stop_reason
        return self._envelope(self.object + (".chunk" if self.call.chat else ""), [choice],
                              usage=None if self.call.include_usage else ...)

    def usage(self) -> dict:
        completion = sum(c.completion_tokens for c in self.choices.values())
        out = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
               "total_tokens": self.prompt_tokens + completion}
        if self.cached_tokens:
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return out

    def usage_chunk(self) -> dict:
        """The last stream chunk with stream_options.include_usage: no choices, the usage."""
        return self._envelope(self.object + (".chunk" if self.call.chat else ""), [],
                              usage=self.usage())

    def final(self) -> dict:
        """The whole (non-streaming) response."""
        choices = []
        for c in self.choices.values():
            if self.call.chat:
                choice = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                          "logprobs": {"content": c.logprobs} if self.call.top_logprobs is not None
                          else None}
            else:
                choice = {"index": c.index, "text": c.text,
                          "logprobs": _legacy(c.logprobs) if self.call.top_logprobs is not None
                          else None}
            choice.update(finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            if self.call.return_token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        return self._envelope(self.object, choices, usage=self.usage())

    def _envelope(self, obj: str, choices: list, usage=...) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not ...:
            out["usage"] = usage
        return out

    async def _logprobs(self, chunk: Chunk, offset: int) -> list | None:
        n = self.call.top_logprobs
        if n is None or not chunk.logprobs:
            return None
        tops = [sorted(lp.items(), key=lambda kv: -kv[1])[:n] for lp in chunk.logprobs]
        ids = list(chunk.token_ids) + [t for top in tops for t, _ in top]
        strings = dict(zip(ids, await self._strings(ids)))
        entries = []
        for token, lp, top in zip(chunk.token_ids, chunk.logprobs, tops):
            if self.call.chat:
                entries.append({"token": strings[token], "logprob": lp.get(token, 0.0),
                                "bytes": list(strings[token].encode()),
                                "top_logprobs": [{"token": strings[t], "logprob": v,
                                                  "bytes": list(strings[t].encode())}
                                                 for t, v in top]})
            else:
                entries.append((strings[token], lp.get(token, 0.0),
                                {strings[t]: v for t, v in top}, offset))
                offset += len(strings[token])
        return entries


def _legacy(entries: list) -> dict:
    """The completions API's logprobs object from (token, logprob, top, offset) entries."""
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [e[2] for e in entries], "text_offset": [e[3] for e in entries]}


def _stop_reason(text: str) -> str | int | None:
    """GatewayCore's stop_reason (a stop string, or a stop token id as text) as vLLM reports it."""
    if not text:
        return None
    return int(text) if text.isdigit() else text
