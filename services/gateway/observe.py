"""What the gateway records about one request: its root span (GenAI attributes) and the
client-facing metrics (time to first token, inter-token latency, end-to-end latency, tokens,
outcome). GatewayCore calls it at a few points of a request's life; nothing here runs per token
beyond two clock reads and a histogram observation per streamed chunk."""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common import errors
from services.common import telemetry as tm
from services.common.metrics import GatewayMetrics


class RequestObserver:
    """One request's span and timings. `context` is the span's context, for child spans."""

    def __init__(self, tracer: trace.Tracer, metrics: GatewayMetrics | None, parent: Context | None,
                 *, response_id: str, operation: str):
        self._metrics = metrics
        self._t0 = time.perf_counter()
        self._last: float | None = None
        self._ended = False
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.ttft_s: float | None = None
        self.queue_time_s: float | None = None
        self.span = tracer.start_span("Generate", parent, kind=SpanKind.SERVER)
        self.context = trace.set_span_in_context(self.span, parent)
        if self.span.is_recording():
            self.span.set_attributes(tm.genai_attributes(response_id=response_id,
                                                         operation=operation))

    def request(self, model: str, params, prompt_tokens: int) -> None:
        """The validated request: model, sampling, prompt length."""
        self.prompt_tokens = prompt_tokens
        if self.span.is_recording():
            self.span.set_attributes(tm.genai_attributes(model=model, input_tokens=prompt_tokens))
            for name, value in ((tm.GEN_AI_REQUEST_MAX_TOKENS, params.max_tokens),
                                (tm.GEN_AI_REQUEST_TEMPERATURE, params.temperature),
                                (tm.GEN_AI_REQUEST_TOP_P, params.top_p)):
                if value is not None:
                    self.span.set_attribute(name, value)

    def delta(self, queue_time_s: float) -> None:
        """The first delta of an attempt carries the scheduler's queue time; the last one counts."""
        if queue_time_s:
            self.queue_time_s = queue_time_s

    def chunk(self, chunk) -> None:
        """A chunk (samples.Chunk) leaves for the client (the caller ends the request with
        finished() once its last sample's last chunk left)."""
        if chunk.token_ids:
            now = time.perf_counter()
            if self._last is None:
                self.ttft_s = now - self._t0
                if self._metrics is not None:
                    self._metrics.time_to_first_token.observe(self.ttft_s)
            elif self._metrics is not None:
                self._metrics.inter_token_latency.observe(now - self._last)
            self._last = now
            self.output_tokens += len(chunk.token_ids)

    def finished(self, reason: str, cached_tokens: int = 0) -> None:
        """The request ended normally ("stop", "length") or the client went away ("abort").
        A no-op once the request has ended."""
        if self._ended:
            return
        self._ended = True
        if self._metrics is not None:
            self._metrics.request_finished(
                prompt_tokens=self.prompt_tokens, generation_tokens=self.output_tokens,
                finished_reason=reason, e2e_s=time.perf_counter() - self._t0)
        if self.span.is_recording():
            self.span.set_attributes(tm.genai_attributes(
                output_tokens=self.output_tokens, finish_reasons=[reason],
                queue_time_s=self.queue_time_s, time_to_first_token_s=self.ttft_s))
            self.span.set_attribute(tm.TAXIWAY_PREFIX_CACHE_HIT_TOKENS, cached_tokens)
        self.span.end()

    def failed(self, exc: BaseException) -> None:
        """The request ended in an error (counted by its gRPC status code)."""
        if self._ended:
            return
        self._ended = True
        code = errors.status_of(exc).name
        if self._metrics is not None:
            self._metrics.request_failed(code)
        if self.span.is_recording():
            self.span.record_exception(exc)
            self.span.set_attribute("error.type", type(exc).__name__)
            self.span.set_attribute("rpc.grpc.status_code", errors.status_of(exc).value[0])
            self.span.set_attributes(tm.genai_attributes(output_tokens=self.output_tokens,
                                                         time_to_first_token_s=self.ttft_s))
            self.span.set_status(Status(StatusCode.ERROR, f"{code}: {exc}"))
        self.span.end()
