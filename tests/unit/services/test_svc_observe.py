"""The cores' spans and metrics without a network: the gateway's request span (GenAI attributes,
enqueue span whose context goes into the entry, outcome counters) and the executor's per-request
spans (execute > prefill, decode) and per-step metrics over the fake engine."""

from __future__ import annotations

import asyncio

import pytest

from gpu_engine.errors import Overloaded
from gpu_engine.sampling_params import SamplingParams
from services.common import telemetry as tm
from services.common.metrics import ExecutorMetrics, GatewayMetrics
from services.common.types import Delta, EngineRequest
from services.executor.core import ExecutorCore
from services.executor.fake import FakeEngine
from services.gateway.core import GenerateInput
from tests.unit.services.test_svc_executor_core import Sink, run
from tests.unit.services.test_svc_gateway_core import gen, ids, make


def sample(metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, {"model_name": "m", **labels}) or 0.0


def gateway(script):
    provider, exporter = tm.in_memory_tracing("taxiway-gateway")
    core, intake = make(script, spread=True)
    core.tracer = provider.get_tracer("t")
    core.metrics = GatewayMetrics("m")
    return core, intake, exporter


def test_gateway_span_carries_the_genai_attributes_and_the_entry_its_context():
    def script(req):
        return [Delta(req.request_id, 0, 0, ids("ab"), num_prompt_tokens=3, num_cached_tokens=2,
                      queue_time_s=0.25),
                Delta(req.request_id, 0, 2, ids("c"), finish_reason="length")]

    core, intake, exporter = gateway(script)
    chunks = gen(core, GenerateInput(SamplingParams(max_tokens=3, temperature=0.5),
                                     request_id="r", text="hi"))
    assert chunks[-1].usage == (3, 3, 2)
    enqueue, root = exporter.get_finished_spans()
    assert (root.name, enqueue.name, enqueue.parent.span_id) == ("Generate", "enqueue",
                                                                 root.context.span_id)
    # the entry carries the enqueue span's context: the scheduler continues from there
    assert intake.submitted[0].traceparent.split("-")[1:3] == [
        format(root.context.trace_id, "032x"), format(enqueue.context.span_id, "016x")]
    a = root.attributes
    assert (a[tm.GEN_AI_REQUEST_MODEL], a[tm.GEN_AI_OPERATION_NAME]) == ("fake-bytes", "text_completion")
    assert (a[tm.GEN_AI_USAGE_INPUT_TOKENS], a[tm.GEN_AI_USAGE_OUTPUT_TOKENS]) == (3, 3)
    assert tuple(a[tm.GEN_AI_RESPONSE_FINISH_REASONS]) == ("length",)
    assert (a[tm.TAXIWAY_QUEUE_TIME], a[tm.TAXIWAY_PREFIX_CACHE_HIT_TOKENS]) == (0.25, 2)
    assert a[tm.TAXIWAY_TIME_TO_FIRST_TOKEN] > 0 and a[tm.GEN_AI_REQUEST_TEMPERATURE] == 0.5
    m = core.metrics
    assert sample(m, "taxiway:request_success_total", finished_reason="length") == 1
    assert sample(m, "taxiway:time_to_first_token_seconds_count") == 1
    assert sample(m, "taxiway:inter_token_latency_seconds_count") == 1
    assert (sample(m, "taxiway:prompt_tokens_total"), sample(m, "taxiway:generation_tokens_total")) \
        == (3, 3)


def test_gateway_counts_errors_and_cancellations():
    core, _, exporter = gateway(lambda req: [Delta(req.request_id, 0, error=("Overloaded", "full"))])
    with pytest.raises(Overloaded):
        gen(core, GenerateInput(SamplingParams(), request_id="r", text="hi"))
    root = exporter.get_finished_spans()[-1]
    assert root.status.status_code.name == "ERROR" and root.attributes["error.type"] == "Overloaded"
    assert sample(core.metrics, "taxiway:request_failure_total", code="RESOURCE_EXHAUSTED") == 1

    core, _, _ = gateway(lambda req: [Delta(req.request_id, 0, 0, ids("a"))])

    async def first_then_close():
        stream = core.generate(GenerateInput(SamplingParams(), request_id="r", text="hi"))
        await anext(stream)
        await stream.aclose()  # the client went away

    asyncio.run(first_then_close())
    assert sample(core.metrics, "taxiway:request_success_total", finished_reason="abort") == 1


def executor():
    provider, exporter = tm.in_memory_tracing("taxiway-executor")
    metrics = ExecutorMetrics("m")
    engine = FakeEngine(num_blocks=64, block_size=4)
    sink = Sink()
    core = ExecutorCore(engine, "e1", sink, tracer=provider.get_tracer("t"), metrics=metrics)
    return core, sink, exporter, metrics


def request(rid, traceparent="", max_tokens=4, **kw):
    return EngineRequest(rid, "g", tuple(range(10, 22)), SamplingParams(max_tokens=max_tokens),
                         traceparent=traceparent, **kw)


def test_executor_spans_per_request_not_per_step():
    core, sink, exporter, metrics = executor()
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    core.admit(request("a", parent, max_tokens=5, queue_time_s=0.5), 1)
    run(core)
    prefill, decode, execute = exporter.get_finished_spans()
    assert [s.name for s in (prefill, decode, execute)] == ["prefill", "decode", "execute"]
    assert format(execute.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert execute.parent.span_id == int("b7ad6b7169203331", 16)
    assert prefill.parent.span_id == decode.parent.span_id == execute.context.span_id
    assert execute.attributes[tm.GEN_AI_USAGE_OUTPUT_TOKENS] == 5
    assert execute.attributes[tm.TAXIWAY_EXECUTOR_ID] == "e1"
    assert [d.queue_time_s for d in sink.deltas("a")] == [0.5, 0, 0, 0, 0]  # the first only
    assert sample(metrics, "taxiway:executor_step_seconds_count") == 5  # one per engine step
    assert sample(metrics, "taxiway:prefix_cache_queries_total") == 12  # 3 blocks of 4, as tokens


def test_executor_metrics_follow_the_engine_and_aborts_end_the_spans():
    core, _, exporter, metrics = executor()
    core.admit(request("a", max_tokens=100), 1)
    core.admit(request("b", max_tokens=100), 2)  # same prompt: its 3 blocks come from the cache
    core.step()
    assert sample(metrics, "taxiway:num_requests_running") == 2
    assert sample(metrics, "taxiway:kv_cache_usage_perc") == pytest.approx(8 / 64)
    assert sample(metrics, "taxiway:prefix_cache_hits_total") == 12
    core.abort(["a", "b"])
    core.step()
    assert sample(metrics, "taxiway:num_requests_running") == 0
    outcomes = {s.attributes.get("taxiway.request.outcome") for s in exporter.get_finished_spans()
                if s.name == "execute"}
    assert outcomes == {"aborted"} and core.idle


def test_executor_drain_publishes_its_state():
    core, *_ = executor()
    _, seen = core.board.read(None, 0)
    core.drain()
    core.step()
    state, _ = core.board.read(seen, 0)
    assert state.draining and core.idle
