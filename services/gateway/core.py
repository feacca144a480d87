"""The gateway's request handling, without gRPC or Redis: validate, tokenize, enqueue, then turn
the executor's token deltas into text (through the tokenizer tier's detokenizer), stop strings into
aborts, a lost executor into a resubmission, and client disconnects and deadlines into aborts.

Resume after a lost executor: the gateway knows exactly which tokens it streamed (`tokens`), so it
resubmits the request (attempt + 1) with them as prior_output_token_ids; the new executor continues
after them, and deltas of older attempts are dropped. No gap, no duplicate, whatever the sampling.
The same resubmission covers what Redis may have lost: after a Redis restart (every request in
flight) and when a request's output shows a gap (entries that never arrived).

Identity: every request gets an internal id made here, never reused; the caller's request_id is a
label (and the key of "already in flight", per caller), so late entries and aborts of an ended
request can never reach a new one.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from gpu_engine.errors import DeadlineExceeded, InvalidRequest, NotReady
from gpu_engine.sampling_params import SamplingParams
from services.common import errors
from services.common.metrics import GatewayMetrics
from services.common.telemetry import PassThroughTracerProvider, inject_context
from services.common.types import Abort, Delta, EngineRequest, ModelInfo
from services.gateway.observe import RequestObserver
from services.gateway.router import CANCELLED, REISSUE, Failed, Mailbox, Router
from services.gateway.validate import check_request

log = logging.getLogger(__name__)


class DetokenizerSession(Protocol):
    def add(self, token_ids: Sequence[int], flush: bool = False) -> tuple[str, str | None]:
        """(new text, the stop string if one matched)."""

    def close(self) -> None: ...


class TokenizerClient(Protocol):
    def tokenize(self, text: str | None = None, messages: list[dict] | None = None,
                 add_special_tokens: bool = True) -> tuple[list[int], str]: ...

    def detokenizer(self, prompt_token_ids: Sequence[int], *, skip_special_tokens: bool,
                    stop: Sequence[str], include_stop_str_in_output: bool) -> DetokenizerSession: ...

    def model_info(self) -> ModelInfo: ...


class Intake(Protocol):
    """The way to the scheduler (the taxiway:requests stream)."""

    def submit(self, request: EngineRequest) -> None: ...

    def abort(self, abort: Abort) -> None: ...


@dataclass(frozen=True)
class GenerateInput:
    """A validated-on-use Generate request, as the gateway's servicer hands it over."""

    params: SamplingParams
    request_id: str = ""
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: list[dict] | None = None
    priority: int = 0


@dataclass
class Chunk:
    """One GenerateResponse."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str = ""
    usage: tuple[int, int, int] | None = None
    """(prompt, completion, cached) tokens, on the last chunk."""
    logprobs: list[dict[int, float]] | None = None


class GatewayCore:
    def __init__(self, gateway_id: str, tokenizer: TokenizerClient, intake: Intake,
                 router: Router | None = None, *, request_timeout_s: float = 600.0,
                 clock=time.time, tracer: trace.Tracer | None = None,
                 metrics: GatewayMetrics | None = None):
        self.gateway_id = gateway_id
        self.tokenizer = tokenizer
        self.intake = intake
        self.router = router or Router()
        self.request_timeout_s = request_timeout_s
        self._clock = clock
        self.tracer = tracer or PassThroughTracerProvider().get_tracer("taxiway.gateway")
        self.metrics = metrics
        """Set by the service once the model is known (its name labels every series)."""

    def new_internal_id(self) -> str:
        """A request id no other request ever had (this gateway's id + a random 128-bit value)."""
        return f"{self.gateway_id}-{uuid.uuid4().hex}"

    def redis_restarted(self) -> int:
        """Redis came back as a new server: every request in flight is submitted again from what
        its client has (the scheduler replaces an attempt it still knows). Returns how many."""
        return self.router.broadcast(REISSUE)

    def redis_lost(self, reason: str) -> int:
        """Redis is gone for good: every request in flight fails at once with UNAVAILABLE."""
        return self.router.broadcast(Failed(NotReady(f"lost Redis: {reason}")))

    def generate(self, inp: GenerateInput, *, caller: str = "", timeout_s: float | None = None,
                 parent: Context | None = None,
                 on_cancel: Callable[[Callable[[], None]], object] | None = None) -> Iterator[Chunk]:
        """Streams the completion. Raises InvalidRequest, Overloaded, NotReady, DeadlineExceeded.

        `caller`: who asks (the API key's name, or the peer): scopes inp.request_id. `parent`: the
        client's trace context (from its gRPC metadata), if any. `on_cancel(fn)` (gRPC's
        context.add_callback) registers what to call when the client goes away: it wakes this
        request's handler, which aborts the request."""
        client_id = inp.request_id or uuid.uuid4().hex
        obs = RequestObserver(self.tracer, self.metrics, parent, response_id=client_id,
                              operation="chat" if inp.messages is not None else "text_completion")
        try:
            for chunk in self._generate(inp, client_id, caller, obs, timeout_s, on_cancel):
                obs.chunk(chunk)
                yield chunk
        except Exception as exc:
            obs.failed(exc)
            raise
        finally:
            obs.finished("abort")  # the client went away; a no-op once the request has ended

    def _open(self, inp: GenerateInput, client_id: str, caller: str, obs: RequestObserver,
              timeout_s: float | None, on_cancel) -> tuple[EngineRequest, Mailbox]:
        """Validates and tokenizes the request, opens its mailbox."""
        rid = self.new_internal_id()
        now = self._clock()
        deadline = now + min(timeout_s or self.request_timeout_s, self.request_timeout_s)
        with _current(obs.context):  # tokenizer calls carry the trace in their metadata
            prompt = self._prompt_ids(inp)
            obs.request(self.tokenizer.model_info().name, inp.params, len(prompt))
        mailbox = self.router.open(rid, (caller, client_id) if inp.request_id else None)
        if mailbox is None:
            raise InvalidRequest(f"request_id {client_id!r} is already in flight")
        if on_cancel is not None:
            on_cancel(lambda: mailbox.put(CANCELLED))
        request = EngineRequest(rid, self.gateway_id, tuple(prompt), inp.params,
                                priority=inp.priority, arrival_time=now, deadline=deadline,
                                client_request_id=client_id)
        return request, mailbox

    def _generate(self, inp: GenerateInput, client_id: str, caller: str, obs: RequestObserver,
                  timeout_s: float | None, on_cancel) -> Iterator[Chunk]:
        request, mailbox = self._open(inp, client_id, caller, obs, timeout_s, on_cancel)
        rid, p, prompt = request.request_id, request.params, request.prompt_token_ids
        detok = None
        done = False
        try:
            with _current(obs.context):
                detok = self.tokenizer.detokenizer(
                    prompt, skip_special_tokens=p.skip_special_tokens, stop=p.stop,
                    include_stop_str_in_output=p.include_stop_str_in_output)
                request = self._submit(request)
            stream = _Stream(client_id, len(prompt))
            while True:
                item = mailbox.get(timeout=max(0.0, request.deadline - self._clock()))
                if item is None:
                    raise DeadlineExceeded(f"request {client_id} passed its deadline")
                if item is CANCELLED:
                    return
                if isinstance(item, Failed):
                    raise item.error
                if item is REISSUE:
                    request = self._resubmit(request, stream, obs, "Redis restarted")
                    continue
                delta: Delta = item
                if delta.attempt != request.attempt:
                    continue  # from an executor that was given up on
                if delta.error is not None:
                    done = True  # the tier that failed it has dropped it already
                    raise errors.from_wire(*delta.error)
                if delta.executor_lost or delta.first_index > len(stream.tokens):
                    why = "executor lost" if delta.executor_lost else (
                        f"tokens {len(stream.tokens)}..{delta.first_index} never arrived")
                    request = self._resubmit(request, stream, obs, why)
                    continue
                obs.delta(delta.queue_time_s)
                chunk = stream.take(delta, detok)
                if chunk is None:
                    continue
                if chunk.finish_reason is not None:
                    if delta.finish_reason is None:  # a stop string: the executor goes on
                        self._abort(Abort(rid, "stop_string"))
                    done = True
                    yield chunk
                    return
                yield chunk
        finally:
            self.router.close(rid)
            if detok is not None:
                detok.close()
            if not done:
                self._abort(Abort(rid, "cancelled"))

    def _abort(self, abort: Abort) -> None:
        try:
            self.intake.abort(abort)
        except NotReady as exc:  # Redis is gone: so are the scheduler's entries of it, or soon
            log.warning("could not abort request %s: %s", abort.request_id, exc)

    def _resubmit(self, request: EngineRequest, stream: _Stream, obs: RequestObserver,
                  why: str) -> EngineRequest:
        """The next attempt, from every token the client has (the resume after a lost executor)."""
        request = replace(request, attempt=request.attempt + 1,
                          prior_output_token_ids=tuple(stream.tokens))
        log.warning("request %s (%s): %s; resubmitting after %d tokens (attempt %d)",
                    stream.client_id, request.request_id, why, len(stream.tokens), request.attempt)
        with _current(obs.context):
            return self._submit(request)

    def _submit(self, request: EngineRequest) -> EngineRequest:
        """XADDs the request inside an `enqueue` span, whose context travels in the entry."""
        with self.tracer.start_as_current_span("enqueue", kind=SpanKind.PRODUCER) as span:
            span.set_attribute("taxiway.request.attempt", request.attempt)
            request = replace(request, traceparent=inject_context().get("traceparent", ""))
            self.intake.submit(request)
        return request

    def _prompt_ids(self, inp: GenerateInput) -> list[int]:
        if inp.text == "" or inp.token_ids == () or inp.messages == []:
            raise InvalidRequest("the prompt is empty")
        if inp.token_ids is not None:
            prompt = list(inp.token_ids)
        elif inp.text is not None or inp.messages is not None:
            prompt, _ = self.tokenizer.tokenize(text=inp.text, messages=inp.messages)
        else:
            raise InvalidRequest("no prompt: set text, token_ids or messages")
        check_request(prompt, inp.params, self.tokenizer.model_info())
        return prompt


class _Stream:
    """What one request has streamed so far, and the dedupe of incoming deltas."""

    def __init__(self, client_id: str, num_prompt_tokens: int):
        self.client_id = client_id
        self.tokens: list[int] = []
        self.prompt_tokens = num_prompt_tokens
        self.cached_tokens = 0

    def take(self, delta: Delta, detok: DetokenizerSession) -> Chunk | None:
        """The chunk for a delta that starts at or before len(tokens) (the caller resubmits after
        a gap); None when it brings nothing new."""
        skip = len(self.tokens) - delta.first_index
        new = delta.token_ids[skip:]
        if delta.num_prompt_tokens:
            self.cached_tokens = delta.num_cached_tokens
        self.tokens.extend(new)
        text, stop = detok.add(new, flush=delta.finish_reason is not None)
        if not (new or text or stop or delta.finish_reason):
            return None
        chunk = Chunk(self.client_id, new, text,
                      logprobs=delta.logprobs[skip:] if delta.logprobs else None)
        if stop:
            chunk.finish_reason, chunk.stop_reason = "stop", stop
        elif delta.finish_reason:
            chunk.finish_reason = delta.finish_reason
            if delta.stop_token_id is not None:
                chunk.stop_reason = str(delta.stop_token_id)
        if chunk.finish_reason:
            chunk.usage = (self.prompt_tokens, len(self.tokens), self.cached_tokens)
        return chunk


@contextlib.contextmanager
def _current(ctx: Context) -> Iterator[None]:
    """Makes `ctx` current around synchronous calls only: never across a yield of a generator,
    whose consumer may resume it in another context."""
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)
