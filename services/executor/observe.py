"""The executor's part of a request's trace, and its metrics.

Per request, three spans opened and closed at request events only (never per step or per token):
`execute` (admission to finish on this executor, child of the scheduler's admit span) with the
children `prefill` (admission to the first token: waiting in the engine, prompt prefill) and
`decode` (first token to finish). Per step, metrics only: the step's duration, and the engine's
stats sampled after it (a few gauge sets and counter increments).
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from services.common import telemetry as tm
from services.common.metrics import ExecutorMetrics
from services.common.types import EngineRequest


class RequestTrace:
    """One request's spans on this executor."""

    def __init__(self, tracer: trace.Tracer, req: EngineRequest, executor_id: str):
        self._tracer = tracer
        parent = tm.extract_context({"traceparent": req.traceparent})
        self.span = tracer.start_span("execute", parent)
        if self.span.is_recording():
            self.span.set_attributes({
                tm.GEN_AI_RESPONSE_ID: req.request_id, tm.TAXIWAY_EXECUTOR_ID: executor_id,
                tm.GEN_AI_USAGE_INPUT_TOKENS: len(req.prompt_token_ids),
                "taxiway.request.attempt": req.attempt})
        self._context = trace.set_span_in_context(self.span)
        self.phase = tracer.start_span("prefill", self._context)

    def first_token(self, cached_tokens: int) -> None:
        """Prefill is over: decode starts."""
        self.phase.set_attribute(tm.TAXIWAY_PREFIX_CACHE_HIT_TOKENS, cached_tokens)
        self.phase.end()
        self.phase = self._tracer.start_span("decode", self._context)

    def finished(self, reason: str, output_tokens: int) -> None:
        self.phase.end()
        if self.span.is_recording():
            self.span.set_attributes(tm.genai_attributes(output_tokens=output_tokens,
                                                         finish_reasons=[reason]))
        self.span.end()

    def dropped(self, reason: str, error: str | None = None) -> None:
        """Aborted, replaced by a newer attempt, past its deadline, or refused by the engine."""
        self.phase.end()
        if self.span.is_recording():
            self.span.set_attribute("taxiway.request.outcome", reason)
            if error:
                self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()


class StepMetrics:
    """Turns the engine's stats (cumulative counters, current gauges) into ExecutorMetrics."""

    def __init__(self, metrics: ExecutorMetrics):
        self.metrics = metrics
        self._last = (0, 0, 0)  # prefix-cache queries, hits (blocks), preemptions
        self._last_spec = (0, 0, 0, ())  # drafts, draft tokens, accepted tokens, accepted per position
        self._last_compiles = 0

    def step(self, seconds: float) -> None:
        self.metrics.step_seconds.observe(seconds)

    def sample(self, stats) -> None:
        """After a step: gauges set, counters advanced by what the engine counted since."""
        m = self.metrics
        m.num_requests_running.set(stats.num_running)
        m.kv_cache_usage.set(stats.kv_cache_usage)
        now = (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_preemptions)
        queries, hits, preemptions = (max(0, a - b) for a, b in zip(now, self._last))
        self._last = now
        if queries:  # the engine counts blocks; the metrics count tokens, as vLLM's do
            m.prefix_cache_lookup(queries * stats.block_size, hits * stats.block_size)
        if preemptions:
            m.num_preemptions.inc(preemptions)
        compiles = stats.kernel_compiles_late
        if compiles > self._last_compiles:
            m.kernel_compiles_after_start.inc(compiles - self._last_compiles)
            self._last_compiles = compiles
        spec = (stats.spec_num_drafts, stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens,
                stats.spec_num_accepted_tokens_per_pos)
        if spec[0] != self._last_spec[0]:
            last_pos = self._last_spec[3]
            per_pos = [n - (last_pos[j] if j < len(last_pos) else 0) for j, n in enumerate(spec[3])]
            m.spec_decode(*(a - b for a, b in zip(spec[:3], self._last_spec[:3])), per_pos)
            self._last_spec = spec
