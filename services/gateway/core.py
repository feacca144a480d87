"""The gateway's request handling, without gRPC or Redis, on one asyncio event loop: validate,
tokenize, enqueue, then turn the executor's token deltas into text (through the tokenizer tier's
detokenizer; a model without a tokenizer streams token ids with no exchange at all), stop
strings into aborts, a lost executor into a resubmission, and a client that went away (its task
cancelled) or a deadline into aborts. No thread and no task per request but
the caller's own: each request waits on its mailbox (router.py).

Resume after a lost executor: the gateway knows exactly which tokens it streamed, so it
resubmits the request (attempt + 1) with them as prior_output_token_ids; the new executor continues
after them, and deltas of older attempts are dropped. No gap, no duplicate, whatever the sampling.
The same resubmission covers what Redis may have lost: after a Redis restart (every request in
flight) and when a request's output shows a gap (entries that never arrived).

n samples: the request is fanned out into n engine requests of one sample each (as vLLM's
front end does), sample i seeded with sample_seed(seed, i) so that its draws are those of
LLM.generate's sample i; each resumes on its own. Prompt logprobs are asked of sample 0 only.

Identity: every engine request gets an internal id made here, never reused; the caller's
request_id is a label (and the key of "already in flight", per caller), so late entries and
aborts of an ended request can never reach a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from gpu_engine.errors import DeadlineExceeded, InvalidRequest, NotReady, Overloaded
from gpu_engine.sampling_params import SamplingParams, sample_seed
from services.common import errors
from services.common.metrics import GatewayMetrics
from services.common.telemetry import PassThroughTracerProvider, inject_context
from services.common.types import Abort, Delta, EngineRequest, ModelInfo
from services.gateway.observe import RequestObserver
from services.gateway.router import REISSUE, SHUTDOWN, Failed, Mailbox, Router
from services.gateway.samples import Chunk, DetokenizerSession, Sample, TextlessSession, coalesce
from services.gateway.validate import check_request

__all__ = ["Chunk", "GatewayCore", "GenerateInput", "Intake", "TokenizerClient"]
log = logging.getLogger(__name__)


class TokenizerClient(Protocol):
    async def tokenize(self, text: str | None = None, messages: list[dict] | None = None,
                       add_special_tokens: bool = True) -> tuple[list[int], str]: ...

    async def detokenizer(self, prompt_token_ids, *, skip_special_tokens: bool, stop,
                          include_stop_str_in_output: bool) -> DetokenizerSession: ...

    async def model_info(self) -> ModelInfo: ...


class Intake(Protocol):
    """The way to the scheduler (the taxiway:requests stream)."""

    async def submit(self, request: EngineRequest) -> None: ...

    async def abort(self, abort: Abort) -> None: ...


@dataclass(frozen=True)
class GenerateInput:
    """A validated-on-use Generate request, as the gateway's fronts (gRPC, OpenAI) hand it over."""

    params: SamplingParams
    request_id: str = ""
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: list[dict] | None = None
    priority: int = 0


@dataclass
class _Group:
    """A request's samples and their shared mailbox."""

    samples: list[Sample]
    mailbox: Mailbox
    deadline: float

    def by_id(self, request_id: str) -> Sample | None:
        if len(self.samples) == 1:  # n=1: no search
            s = self.samples[0]
            return s if s.request.request_id == request_id else None
        return next((s for s in self.samples if s.request.request_id == request_id), None)

    @property
    def live(self) -> list[Sample]:
        return [s for s in self.samples if not s.ended]

    def streaming(self) -> bool:
        """Whether a sample still sends (`live` without building the list, once per chunk)."""
        if len(self.samples) == 1:
            return not self.samples[0].ended
        return any(not s.ended for s in self.samples)


class GatewayCore:
    def __init__(self, gateway_id: str, tokenizer: TokenizerClient, intake: Intake,
                 router: Router | None = None, *, request_timeout_s: float = 600.0,
                 max_concurrent_requests: int = 8192, clock=time.time,
                 tracer: trace.Tracer | None = None, metrics: GatewayMetrics | None = None):
        self.gateway_id = gateway_id
        self.tokenizer = tokenizer
        self.intake = intake
        self.router = router or Router()
        self.request_timeout_s = request_timeout_s
        self.max_concurrent_requests = max_concurrent_requests
        self.active = 0
        """Requests in flight (each holds one of max_concurrent_requests)."""
        self._cleanups: set[asyncio.Future] = set()
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

    def shutdown(self) -> int:
        """The gateway stops: every request in flight ends now, as cancelled (its last chunk says
        so), and is aborted in the engine."""
        return self.router.broadcast(SHUTDOWN)

    async def generate(self, inp: GenerateInput, *, caller: str = "",
                       timeout_s: float | None = None,
                       parent: Context | None = None) -> AsyncIterator[Chunk]:
        """Streams the completion, the samples' chunks interleaved (Chunk.index). Raises
        InvalidRequest, Overloaded, NotReady, DeadlineExceeded. Cancelling the consuming task
        (the client went away) aborts the request.

        `caller`: who asks (the API key's name, or the peer): scopes inp.request_id. `parent`: the
        client's trace context, if any."""
        if self.active >= self.max_concurrent_requests:
            raise Overloaded(f"this gateway holds {self.active} requests, its limit "
                             f"(max_concurrent_requests={self.max_concurrent_requests}); retry "
                             "later or on another replica")
        self.active += 1
        client_id = inp.request_id or uuid.uuid4().hex
        obs = RequestObserver(self.tracer, self.metrics, parent, response_id=client_id,
                              operation="chat" if inp.messages is not None else "text_completion")
        reason, cached = "abort", 0
        try:
            async for chunk in self._generate(inp, client_id, caller, obs, timeout_s):
                obs.chunk(chunk)
                if chunk.finish_reason is not None:
                    reason, cached = chunk.finish_reason, chunk.usage[2] if chunk.usage else 0
                yield chunk
            obs.finished(reason, cached)
        except Exception as exc:
            obs.failed(exc)
            raise
        finally:
            self.active -= 1
            obs.finished("abort")  # the client went away; a no-op once the request has ended

    async def _open(self, inp: GenerateInput, client_id: str, caller: str, obs: RequestObserver,
                    timeout_s: float | None) -> _Group:
        """Validates and tokenizes the request, opens its mailbox (one per request)."""
        now = self._clock()
        deadline = now + min(timeout_s or self.request_timeout_s, self.request_timeout_s)
        with _current(obs.context):  # tokenizer calls carry the trace in their metadata
            prompt = await self._prompt_ids(inp)
            obs.request((await self.tokenizer.model_info()).name, inp.params, len(prompt))
        p = inp.params
        samples = []
        for i in range(p.n):
            params = replace(p, n=1, prompt_logprobs=p.prompt_logprobs if i == 0 else None,
                             seed=None if p.seed is None else sample_seed(p.seed, i))
            request = EngineRequest(self.new_internal_id(), self.gateway_id, tuple(prompt), params,
                                    priority=inp.priority, arrival_time=now, deadline=deadline,
                                    client_request_id=client_id)
            samples.append(Sample(client_id, i, request, len(prompt)))
        mailbox = self.router.open([s.request.request_id for s in samples],
                                   (caller, client_id) if inp.request_id else None)
        if mailbox is None:
            raise InvalidRequest(f"request_id {client_id!r} is already in flight")
        return _Group(samples, mailbox, deadline)

    async def _generate(self, inp: GenerateInput, client_id: str, caller: str,
                        obs: RequestObserver, timeout_s: float | None) -> AsyncIterator[Chunk]:
        group = await self._open(inp, client_id, caller, obs, timeout_s)
        p = inp.params
        try:
            with _current(obs.context):
                await self._start(group, p)
            while group.streaming():
                items = await group.mailbox.get_all(group.deadline - self._clock())
                if items is None:
                    raise DeadlineExceeded(f"request {client_id} passed its deadline")
                if len(items) == 1 and type(items[0]) is Delta:  # the usual: one step's delta
                    chunk = await self._take(group, items[0], obs)
                    if chunk is not None:
                        yield chunk
                    continue
                for chunk in await self._handle(group, coalesce(items), obs):
                    yield chunk
        finally:
            self.router.close([s.request.request_id for s in group.samples])
            # shielded: a cancelled task (anyio cancels again at every await) still sends its aborts
            cleanup = asyncio.ensure_future(self._cleanup(group))
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            await asyncio.shield(cleanup)

    async def _start(self, group: _Group, p: SamplingParams) -> None:
        """Enqueues the samples while their detokenizers open (the Detokenize stream's set-up is
        then off the way to the first token). Both finish before an error is raised, so the
        cleanup's aborts come after the submits."""
        textless = (await self.tokenizer.model_info()).token_ids_only

        async def detokenizers() -> None:
            for s in group.samples:
                s.detok = TextlessSession() if textless else await self.tokenizer.detokenizer(
                    s.request.prompt_token_ids, skip_special_tokens=p.skip_special_tokens,
                    stop=p.stop, include_stop_str_in_output=p.include_stop_str_in_output)

        async def submits() -> None:
            for s in group.samples:
                s.request = await self._submit(s.request)

        for outcome in await asyncio.gather(detokenizers(), submits(), return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    async def _cleanup(self, group: _Group) -> None:
        """Closes each sample's detokenizer and aborts what still runs upstream."""
        for s in group.samples:
            if s.detok is not None:
                await s.detok.aclose()
            if not s.done:
                await self._abort(Abort(s.request.request_id, "cancelled"))

    async def _handle(self, group: _Group, items: list, obs: RequestObserver) -> list[Chunk]:
        """The chunks for what the mailbox held (in order); raises the error of a failed sample."""
        chunks = []
        for item in items:
            if item is SHUTDOWN:
                chunks += [s.cancelled() for s in group.live]
            elif isinstance(item, Failed):
                raise item.error
            elif item is REISSUE:
                for s in group.live:
                    await self._resubmit(s, obs, "Redis restarted")
            else:
                chunk = await self._take(group, item, obs)
                if chunk is not None:
                    chunks.append(chunk)
        return chunks

    async def _take(self, group: _Group, delta: Delta, obs: RequestObserver) -> Chunk | None:
        s = group.by_id(delta.request_id)
        if s is None or s.ended or delta.attempt != s.request.attempt:
            return None  # ended, or from an executor that was given up on
        if delta.error is not None:
            s.done = s.ended = True  # the tier that failed it has dropped it already
            raise errors.from_wire(*delta.error)
        if delta.executor_lost or delta.first_index > len(s.tokens):
            why = "executor lost" if delta.executor_lost else (
                f"tokens {len(s.tokens)}..{delta.first_index} never arrived")
            await self._resubmit(s, obs, why)
            return None
        obs.delta(delta.queue_time_s)
        chunk = s.take_now(delta) if s.textless else await s.take(delta)
        if chunk is not None and chunk.finish_reason is not None:
            if delta.finish_reason is None:  # a stop string: the executor goes on
                await self._abort(Abort(s.request.request_id, "stop_string"))
            s.done = s.ended = True
        return chunk

    async def _abort(self, abort: Abort) -> None:
        try:
            await self.intake.abort(abort)
        except NotReady as exc:  # Redis is gone: so are the scheduler's entries of it, or soon
            log.warning("could not abort request %s: %s", abort.request_id, exc)

    async def _resubmit(self, s: Sample, obs: RequestObserver, why: str) -> None:
        """The next attempt, from every token the client has (the resume after a lost executor)."""
        request = replace(s.request, attempt=s.request.attempt + 1,
                          prior_output_token_ids=tuple(s.tokens))
        log.warning("request %s[%d] (%s): %s; resubmitting after %d tokens (attempt %d)",
                    s.client_id, s.index, request.request_id, why, len(s.tokens), request.attempt)
        with _current(obs.context):
            s.request = await self._submit(request)

    async def _submit(self, request: EngineRequest) -> EngineRequest:
        """XADDs the request inside an `enqueue` span, whose context travels in the entry."""
        with self.tracer.start_as_current_span("enqueue", kind=SpanKind.PRODUCER) as span:
            span.set_attribute("taxiway.request.attempt", request.attempt)
            request = replace(request, traceparent=inject_context().get("traceparent", ""))
            await self.intake.submit(request)
        return request

    async def _prompt_ids(self, inp: GenerateInput) -> list[int]:
        if inp.text == "" or inp.token_ids == () or inp.messages == []:
            raise InvalidRequest("the prompt is empty")
        if inp.token_ids is not None:
            prompt = list(inp.token_ids)
        elif inp.text is not None or inp.messages is not None:
            prompt, _ = await self.tokenizer.tokenize(text=inp.text, messages=inp.messages)
        else:
            raise InvalidRequest("no prompt: set text, token_ids or messages")
        check_request(prompt, inp.params, await self.tokenizer.model_info())
        return prompt


@contextlib.contextmanager
def _current(ctx: Context) -> Iterator[None]:
    """Makes `ctx` current around calls inside one step of the request's task only: never across
    a yield to the consumer."""
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)
