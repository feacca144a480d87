"""OpenTelemetry tracing for the taxiway tiers: setup, W3C context in plain dicts, attribute names.

One trace per request crosses every tier. The gateway starts it; each hop carries the W3C
`traceparent` (and `tracestate`) header in a plain dict: gRPC metadata between tiers, extra fields
of the Redis stream entry between the gateway and the scheduler, and on to the executor.

    provider = setup_tracing("taxiway-gateway")          # once per tier instance, at start-up
    tracer = provider.get_tracer("taxiway.gateway")
    with tracer.start_as_current_span("generate", attributes=genai_attributes(model=m)):
        fields = {"request": payload, **inject_context()}  # -> XADD taxiway:requests
    ...
    ctx = extract_context(entry_fields)                     # in the scheduler, bytes keys fine
    with tracer.start_as_current_span("admit", context=ctx): ...
    shutdown_tracing(provider)                              # on drain: flushes queued spans

Tracing is on only when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set
and not empty (read when setup_tracing is called, never at import), or when a test passes an
exporter. Otherwise setup_tracing returns a no-op provider: spans are non-recording and cost a few
microseconds, and incoming trace context still passes through unchanged. The SDK and the OTLP
exporter are imported only when used.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:  # the SDK is imported lazily at run time
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"  # the traces-only variant also turns it on

# --- attribute names -------------------------------------------------------------------------
# OpenTelemetry GenAI semantic conventions (gen_ai.*), as the spans of one request carry them.
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"  # "text_completion" or "chat"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"  # model name as the client asked for it
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"  # taxiway's request id
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"  # list[str], e.g. ["stop"]
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"  # prompt tokens
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"  # generated tokens
# taxiway's own, in seconds (floats); the GenAI conventions have no per-span latency names.
TAXIWAY_QUEUE_TIME = "taxiway.latency.time_in_queue"  # enqueue -> admitted to an executor
TAXIWAY_TIME_TO_FIRST_TOKEN = "taxiway.latency.time_to_first_token"  # arrival -> first token
TAXIWAY_EXECUTOR_ID = "taxiway.executor.id"  # which executor ran the request
TAXIWAY_PREFIX_CACHE_HIT_TOKENS = "taxiway.prefix_cache.hit_tokens"  # prompt tokens reused

# W3C Trace Context (traceparent, tracestate) plus W3C Baggage, set explicitly rather than through
# the process-global propagator so every tier speaks the same headers whatever OTEL_PROPAGATORS says.
_PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
TRACE_FIELDS = tuple(sorted(_PROPAGATOR.fields))  # ("baggage", "traceparent", "tracestate")


def setup_tracing(
    service_name: str,
    *,
    exporter: SpanExporter | None = None,
    resource_attributes: Mapping[str, Any] | None = None,
    set_global: bool = False,
) -> trace.TracerProvider:
    """Make the tracer provider of one tier instance.

    service_name: the OpenTelemetry `service.name`, e.g. "taxiway-gateway".
    exporter: a test's exporter (e.g. InMemorySpanExporter); spans reach it synchronously, when
        they end. When given, the OTLP endpoint variables are ignored.
    resource_attributes: more resource attributes (e.g. {"taxiway.executor.id": "ex-3"});
        `service.instance.id` defaults to a fresh uuid4.
    set_global: also install it as OpenTelemetry's global provider (possible once per process).
        Off by default so that several tiers in one process (all-in-one mode, tests) each keep
        their own service.name; get tracers from the returned provider.

    Returns an SDK TracerProvider when tracing is on (OTLP over gRPC, batched; the exporter reads
    the OTEL_EXPORTER_OTLP_* variables, the SDK reads OTEL_TRACES_SAMPLER and OTEL_BSP_*), and a
    PassThroughTracerProvider (a no-op provider that keeps the caller's trace context) otherwise.
    Call shutdown_tracing() on it when the tier stops.
    """
    endpoint = os.environ.get(TRACES_ENDPOINT_ENV, "").strip() or os.environ.get(ENDPOINT_ENV, "").strip()
    if exporter is None and not endpoint:
        provider: trace.TracerProvider = PassThroughTracerProvider()
    else:
        provider = _sdk_provider(service_name, exporter, resource_attributes or {})
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


class _PassThroughTracer(trace.NoOpTracer):
    """Records nothing, but its spans carry the parent's span context, so what a tier with tracing
    off forwards still belongs to the caller's trace (opentelemetry-api >= 1.45 does this itself;
    older releases return an invalid span and the trace breaks)."""

    def start_span(self, name: str, context: Context | None = None, *args: Any, **kwargs: Any
                   ) -> trace.Span:
        return trace.NonRecordingSpan(trace.get_current_span(context).get_span_context())

    @contextmanager
    def start_as_current_span(
        self, name: str, context: Context | None = None, *args: Any, end_on_exit: bool = True,
        **kwargs: Any,
    ) -> Iterator[trace.Span]:
        with trace.use_span(self.start_span(name, context), end_on_exit=end_on_exit) as span:
            yield span


class PassThroughTracerProvider(trace.NoOpTracerProvider):
    """The provider of a tier with tracing off (see _PassThroughTracer)."""

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _PassThroughTracer()


def _sdk_provider(
    service_name: str, exporter: SpanExporter | None, extra: Mapping[str, Any]
) -> trace.TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    attributes = {
        "service.name": service_name,
        "service.namespace": "taxiway",
        "service.instance.id": str(uuid.uuid4()),
        **extra,
    }
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # Reads the endpoint, OTEL_EXPORTER_OTLP_INSECURE, _HEADERS, _TIMEOUT ... itself
        # (an http:// endpoint means plaintext).
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def in_memory_tracing(
    service_name: str = "taxiway-test",
) -> tuple[trace.TracerProvider, InMemorySpanExporter]:
    """For tests: a recording provider whose finished spans land in the returned exporter
    (`exporter.get_finished_spans()`, `exporter.clear()`)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    return setup_tracing(service_name, exporter=exporter), exporter


def shutdown_tracing(provider: trace.TracerProvider) -> None:
    """Flush queued spans and stop the exporter; a no-op for the no-op provider."""
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


def inject_context(carrier: dict[str, str] | None = None, context: Context | None = None) -> dict[str, str]:
    """Write the current (or given) trace context into `carrier` and return it.

    The keys are W3C header names (`traceparent`, `tracestate`, `baggage`), lower case, so the dict
    serves as gRPC metadata (`metadata=tuple(inject_context().items())`) and as Redis stream entry
    fields. Without an active span nothing is written.
    """
    carrier = {} if carrier is None else carrier
    _PROPAGATOR.inject(carrier, context=context)
    return carrier


def extract_context(carrier: Mapping[Any, Any] | Iterable[tuple[Any, Any]]) -> Context:
    """Read a trace context back from a dict or (key, value) pairs: a Redis stream entry (bytes keys
    and values are fine), gRPC `invocation_metadata()`, or what inject_context() wrote. Other keys are
    ignored. Pass the result as `context=` to start_as_current_span to continue the trace; with no
    trace fields it is an empty context, and the next span starts a new trace."""
    pairs = carrier.items() if isinstance(carrier, Mapping) else carrier
    wanted = {}
    for key, value in pairs:
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key.lower() in TRACE_FIELDS:
            wanted[key.lower()] = value.decode() if isinstance(value, bytes) else str(value)
    return _PROPAGATOR.extract(wanted)


def genai_attributes(
    *,
    model: str | None = None,
    operation: str | None = None,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    finish_reasons: Iterable[str] | None = None,
    queue_time_s: float | None = None,
    time_to_first_token_s: float | None = None,
    response_id: str | None = None,
) -> dict[str, Any]:
    """Span attributes under the names above, leaving out those that are None:
    `span.set_attributes(genai_attributes(input_tokens=12, finish_reasons=["stop"]))`."""
    values = {
        GEN_AI_REQUEST_MODEL: model,
        GEN_AI_OPERATION_NAME: operation,
        GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
        GEN_AI_USAGE_OUTPUT_TOKENS: output_tokens,
        GEN_AI_RESPONSE_FINISH_REASONS: None if finish_reasons is None else list(finish_reasons),
        TAXIWAY_QUEUE_TIME: queue_time_s,
        TAXIWAY_TIME_TO_FIRST_TOKEN: time_to_first_token_s,
        GEN_AI_RESPONSE_ID: response_id,
    }
    return {name: value for name, value in values.items() if value is not None}
