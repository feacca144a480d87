"""services.common.telemetry: setup, in-memory spans with GenAI attributes, context round trips."""

from __future__ import annotations

import pytest
from opentelemetry import trace

from services.common import telemetry as tm


@pytest.fixture(autouse=True)
def no_otlp_env(monkeypatch):
    for name in (tm.ENDPOINT_ENV, tm.TRACES_ENDPOINT_ENV):
        monkeypatch.delenv(name, raising=False)


def test_tracing_off_without_endpoint():
    provider = tm.setup_tracing("taxiway-gateway")
    assert isinstance(provider, tm.PassThroughTracerProvider)
    with provider.get_tracer("t").start_as_current_span("generate") as span:
        assert not span.is_recording()
        assert tm.inject_context() == {}  # nothing to propagate, nothing written
    tm.shutdown_tracing(provider)  # no-op, no error


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_endpoint_counts_as_unset(monkeypatch, value):
    monkeypatch.setenv(tm.ENDPOINT_ENV, value)
    assert isinstance(tm.setup_tracing("x"), tm.PassThroughTracerProvider)


@pytest.mark.parametrize("env", [tm.ENDPOINT_ENV, tm.TRACES_ENDPOINT_ENV])
def test_endpoint_read_at_call_time_turns_on_otlp(monkeypatch, env):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    monkeypatch.setenv(env, "http://127.0.0.1:4317")  # nothing is sent: no span is made
    provider = tm.setup_tracing("taxiway-scheduler", resource_attributes={"taxiway.pool": "a"})
    try:
        assert isinstance(provider, TracerProvider)
        (processor,) = provider._active_span_processor._span_processors
        assert isinstance(processor, BatchSpanProcessor)
        assert isinstance(processor.span_exporter, OTLPSpanExporter)
        attrs = provider.resource.attributes
        assert attrs["service.name"] == "taxiway-scheduler"
        assert attrs["service.namespace"] == "taxiway"
        assert attrs["taxiway.pool"] == "a"
        assert attrs["service.instance.id"]
    finally:
        tm.shutdown_tracing(provider)


def test_in_memory_exporter_captures_genai_attributes():
    provider, exporter = tm.in_memory_tracing("taxiway-gateway")
    tracer = provider.get_tracer("taxiway.gateway")
    with tracer.start_as_current_span("generate", kind=trace.SpanKind.SERVER) as span:
        span.set_attributes(tm.genai_attributes(model="SmolLM2-135M-Instruct", operation="chat"))
        span.set_attributes(tm.genai_attributes(
            input_tokens=12, output_tokens=30, finish_reasons=["stop"],
            queue_time_s=0.004, time_to_first_token_s=0.05, response_id="req-1"))
    (finished,) = exporter.get_finished_spans()
    assert finished.name == "generate"
    assert finished.resource.attributes["service.name"] == "taxiway-gateway"
    assert dict(finished.attributes) == {
        "gen_ai.request.model": "SmolLM2-135M-Instruct",
        "gen_ai.operation.name": "chat",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 30,
        "gen_ai.response.finish_reasons": ("stop",),
        "taxiway.latency.time_in_queue": 0.004,
        "taxiway.latency.time_to_first_token": 0.05,
        "gen_ai.response.id": "req-1",
    }


def test_genai_attributes_drops_none():
    assert tm.genai_attributes() == {}
    assert tm.genai_attributes(output_tokens=0) == {tm.GEN_AI_USAGE_OUTPUT_TOKENS: 0}


def test_context_survives_redis_entry_round_trip():
    """gateway -> XADD fields -> (Redis returns bytes) -> scheduler continues the same trace."""
    gw_provider, gw_spans = tm.in_memory_tracing("taxiway-gateway")
    sc_provider, sc_spans = tm.in_memory_tracing("taxiway-scheduler")
    with gw_provider.get_tracer("gw").start_as_current_span("enqueue") as parent:
        fields = {"request_id": "r1", "payload": "..."}
        tm.inject_context(fields)
    assert set(fields) >= {"traceparent"}
    as_redis_returns = {k.encode(): v.encode() for k, v in fields.items()}

    ctx = tm.extract_context(as_redis_returns)
    with sc_provider.get_tracer("sc").start_as_current_span("admit", context=ctx):
        pass
    (admit,) = sc_spans.get_finished_spans()
    (enqueue,) = gw_spans.get_finished_spans()
    assert admit.context.trace_id == enqueue.context.trace_id == parent.get_span_context().trace_id
    assert admit.parent.span_id == enqueue.context.span_id
    assert admit.parent.is_remote
    assert admit.resource.attributes["service.name"] == "taxiway-scheduler"


def test_context_survives_grpc_metadata_round_trip():
    provider, spans = tm.in_memory_tracing()
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("client") as client:
        metadata = tuple(tm.inject_context().items())  # what a stub call takes as metadata=
    received = list(metadata) + [("user-agent", "grpc-python"), ("x-other", b"bin")]
    with tracer.start_as_current_span("server", context=tm.extract_context(received)) as server:
        pass
    assert server.parent.span_id == client.get_span_context().span_id
    assert len(spans.get_finished_spans()) == 2


def test_baggage_and_tracestate_pass_through():
    carrier = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=abc",
        "baggage": "tenant=acme",
    }
    assert tm.inject_context(context=tm.extract_context(carrier)) == carrier


def test_extract_without_trace_fields_starts_new_trace():
    provider, spans = tm.in_memory_tracing()
    with provider.get_tracer("t").start_as_current_span("root", context=tm.extract_context({"a": "b"})):
        pass
    (root,) = spans.get_finished_spans()
    assert root.parent is None


def test_tracing_off_still_passes_context_through():
    """A tier with tracing off keeps the caller's trace id on what it forwards."""
    incoming = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    tracer = tm.setup_tracing("off").get_tracer("t")
    with tracer.start_as_current_span("hop", context=tm.extract_context(incoming)):
        assert tm.inject_context() == incoming


def test_pass_through_tracer_works_as_decorator_and_with_start_span():
    tracer = tm.setup_tracing("off").get_tracer("t")

    @tracer.start_as_current_span("decorated")
    def work() -> bool:
        return trace.get_current_span().is_recording()

    assert work() is False
    span = tracer.start_span("plain", context=tm.extract_context(
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}))
    assert format(span.get_span_context().trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    span.end()
