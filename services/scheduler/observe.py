"""The scheduler's part of a request's trace and its metrics.

An `admit` span per request (CONSUMER of the request stream), child of the gateway's enqueue span
(the entry's traceparent). It starts when the gateway wrote the entry (the Redis entry id's time)
and ends when the request is admitted to an executor, so its length is the queue time; or when the
request is rejected or aborted while waiting. The executor continues the trace from it: the
request sent in Admit carries the admit span's traceparent and the queue time.
"""

from __future__ import annotations

import time
from dataclasses import replace

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common import telemetry as tm
from services.common.metrics import SchedulerMetrics
from services.common.types import EngineRequest


def entry_time(entry_id: str) -> float | None:
    """Unix time (s) at which Redis added a stream entry ("<ms>-<seq>"); None if unreadable."""
    try:
        return int(entry_id.split("-", 1)[0]) / 1000.0
    except ValueError:
        return None


class Admissions:
    """Open admit spans by request id. Only the scheduler's core thread calls it."""

    def __init__(self, tracer: trace.Tracer):
        self._tracer = tracer
        self._open: dict[str, tuple[trace.Span, float]] = {}
        self.metrics: SchedulerMetrics | None = None
        """Set once the model is known (from the executors' registrations)."""

    def __len__(self) -> int:
        return len(self._open)

    def received(self, request: EngineRequest, entry_id: str, now: float) -> None:
        """A submit entry was read: open its span (a resubmission replaces the older one)."""
        enqueued = min(entry_time(entry_id) or now, now)
        parent = tm.extract_context({"traceparent": request.traceparent})
        span = self._tracer.start_span("admit", parent, kind=SpanKind.CONSUMER,
                                       start_time=int(enqueued * 1e9))
        if span.is_recording():
            span.set_attributes({tm.GEN_AI_RESPONSE_ID: request.request_id,
                                 "taxiway.request.attempt": request.attempt,
                                 "taxiway.request.priority": request.priority})
        self.dropped(request.request_id, "replaced")
        self._open[request.request_id] = (span, enqueued)

    def admitted(self, request: EngineRequest, executor_id: str) -> EngineRequest:
        """Ends the span; returns the request to send in Admit, carrying the admit span's trace
        context and the queue time."""
        span, enqueued = self._open.pop(request.request_id, (None, None))
        if span is None:
            return request
        waited = max(0.0, time.time() - enqueued)
        if self.metrics is not None:
            self.metrics.request_queue_time.observe(waited)
        if span.is_recording():
            span.set_attributes({tm.TAXIWAY_QUEUE_TIME: waited, tm.TAXIWAY_EXECUTOR_ID: executor_id})
        traceparent = tm.inject_context(context=trace.set_span_in_context(span)).get(
            "traceparent", request.traceparent)
        span.end()
        return replace(request, traceparent=traceparent, queue_time_s=waited)

    def dropped(self, request_id: str, reason: str, error: str | None = None) -> None:
        """The request left the queue without an admission (rejected, aborted, replaced)."""
        span, _ = self._open.pop(request_id, (None, None))
        if span is None:
            return
        if span.is_recording():
            span.set_attribute("taxiway.request.outcome", reason)
            if error:
                span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    def close(self) -> None:
        for rid in list(self._open):
            self.dropped(rid, "scheduler stopped")
