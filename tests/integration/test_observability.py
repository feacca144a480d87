"""Traces and metrics through the whole stack (four tiers in this process, real gRPC and Redis,
fake engine): one connected trace per request across all four tiers with the GenAI attributes,
and every tier's /metrics endpoint moving with the traffic."""

from __future__ import annotations

import threading
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common import telemetry as tm
from services.common.config import ROLES
from services.common.proto import pb
from tests.integration.svc_stack import wait_for

pytestmark = pytest.mark.timeout(120)

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


def _spans(exporters) -> list:
    return [s for e in exporters.values() for s in e.get_finished_spans()]


def test_one_trace_from_the_client_through_all_four_tiers(stack_factory):
    tracing = {role: tm.in_memory_tracing(f"taxiway-{role}") for role in ROLES}
    stack = stack_factory(tracer_providers={r: p for r, (p, _) in tracing.items()})
    exporters = {r: e for r, (_, e) in tracing.items()}
    req = pb.GenerateRequest(text="Hello, trace!", sampling=pb.SamplingParams(max_tokens=8))
    metadata = (("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),)
    chunks = list(stack.stub.Generate(req, timeout=30, metadata=metadata))
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    # the tokenizer's Detokenize span ends when the gateway has closed the stream, just after
    wait_for(lambda: any(s.name == "Detokenize" for s in _spans(exporters)), 10, "Detokenize")

    spans = _spans(exporters)
    by_name = {s.name: s for s in spans}
    assert sorted(by_name) == ["Detokenize", "Generate", "Tokenize", "admit", "decode", "enqueue",
                               "execute", "prefill"]
    assert len(spans) == len(by_name)  # one of each for one request
    assert {format(s.context.trace_id, "032x") for s in spans} == {CLIENT_TRACE}
    services = {s.name: s.resource.attributes["service.name"] for s in spans}
    assert set(services.values()) == {f"taxiway-{r}" for r in ROLES}
    assert services["admit"] == "taxiway-scheduler" and services["decode"] == "taxiway-executor"

    parents = {s.name: s.parent.span_id if s.parent else None for s in spans}
    ids = {name: s.context.span_id for name, s in by_name.items()}
    assert parents["Generate"] == int(CLIENT_SPAN, 16)  # a child of the client's span
    expected = {"Tokenize": "Generate", "Detokenize": "Generate", "enqueue": "Generate",
                "admit": "enqueue", "execute": "admit", "prefill": "execute", "decode": "execute"}
    assert {n: parents[n] for n in expected} == {n: ids[p] for n, p in expected.items()}

    gen = by_name["Generate"].attributes
    assert gen[tm.GEN_AI_REQUEST_MODEL] == "fake-bytes"
    assert gen[tm.GEN_AI_OPERATION_NAME] == "text_completion"
    assert gen[tm.GEN_AI_USAGE_INPUT_TOKENS] == 14  # BOS + 13 bytes
    assert gen[tm.GEN_AI_USAGE_OUTPUT_TOKENS] == 8
    assert tuple(gen[tm.GEN_AI_RESPONSE_FINISH_REASONS]) == ("length",)
    assert gen[tm.GEN_AI_REQUEST_MAX_TOKENS] == 8
    assert gen[tm.TAXIWAY_QUEUE_TIME] >= 0.0
    assert 0.0 < gen[tm.TAXIWAY_TIME_TO_FIRST_TOKEN] < 30.0
    assert by_name["admit"].attributes[tm.TAXIWAY_QUEUE_TIME] == gen[tm.TAXIWAY_QUEUE_TIME]
    assert by_name["admit"].attributes[tm.TAXIWAY_EXECUTOR_ID] == stack.executors[0].executor_id
    execute = by_name["execute"].attributes
    assert (execute[tm.GEN_AI_USAGE_INPUT_TOKENS], execute[tm.GEN_AI_USAGE_OUTPUT_TOKENS]) == (14, 8)
    assert by_name["prefill"].end_time <= by_name["decode"].start_time


def test_tracing_off_in_some_tiers_keeps_one_trace(stack_factory):
    """The tokenizer and scheduler trace nothing here, yet the executor's spans join the gateway's
    trace: a tier with tracing off passes the context on."""
    tracing = {role: tm.in_memory_tracing(f"taxiway-{role}") for role in ("gateway", "executor")}
    stack = stack_factory(tracer_providers={r: p for r, (p, _) in tracing.items()})
    stack.generate("no client trace", max_tokens=3)
    (gateway_spans, executor_spans) = (e.get_finished_spans() for _, e in tracing.values())
    root = next(s for s in gateway_spans if s.name == "Generate")
    enqueue = next(s for s in gateway_spans if s.name == "enqueue")
    assert root.parent is None  # no client context: the gateway starts the trace
    execute = next(s for s in executor_spans if s.name == "execute")
    assert execute.context.trace_id == root.context.trace_id
    assert execute.parent.span_id == enqueue.context.span_id  # the scheduler passed it through


# -- metrics -----------------------------------------------------------------------------------------

def scrape(port: int) -> tuple[dict, dict]:
    """({(sample name, labels): value}, {family name: type}) of http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def value(samples: dict, name: str, **labels) -> float:
    """Sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def check_histogram(samples: dict, name: str) -> float:
    """Per series: cumulative buckets that never fall, +Inf equal to its _count, a _sum >= 0.
    Returns the count over every series."""
    series: dict[frozenset, list[tuple[float, float]]] = {}
    for (n, labels), v in samples.items():
        if n == name + "_bucket":
            rest = frozenset((k, x) for k, x in labels if k != "le")
            series.setdefault(rest, []).append((float(dict(labels)["le"]), v))
    assert series, f"no {name} series"
    for labels, buckets in series.items():
        buckets.sort()
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and buckets[-1][0] == float("inf"), (name, labels)
        assert buckets[-1][1] == samples[(name + "_count", labels)], (name, labels)
        assert samples[(name + "_sum", labels)] >= 0, (name, labels)
    return value(samples, name + "_count")


def test_every_tier_serves_metrics_that_move_with_traffic(stack_factory):
    # 16 blocks of 4 tokens: two 52-token requests at once cannot both fit, so one is preempted
    stack = stack_factory(fake_num_blocks=16, fake_step_s=0.01)
    ports = {"gateway": stack.gateway.obs.metrics_port, "tokenizer": stack.tokenizer.obs.metrics_port,
             "scheduler": stack.scheduler.obs.metrics_port,
             "executor": stack.executors[0].obs.metrics_port}
    results: list = []
    first = threading.Thread(target=lambda: results.append(stack.generate("x" * 11, max_tokens=40)))
    first.start()
    executor_samples = wait_for(lambda: (s := scrape(ports["executor"])[0]) and value(
        s, "taxiway:num_requests_running") == 1 and s, 10, "a running request in the metrics")
    assert value(executor_samples, "taxiway:kv_cache_usage_perc") > 0
    second = stack.generate("x" * 11, max_tokens=40)  # same prompt: prefix-cache hits
    first.join(30)
    assert [r[-1].finish_reason for r in (results[0], second)] == [pb.FINISH_REASON_LENGTH] * 2
    with pytest.raises(grpc.RpcError) as err:
        stack.generate("too long", max_tokens=5000)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stack.wait_idle()

    got = {role: scrape(port) for role, port in ports.items()}
    gw, types = got["gateway"]
    assert types["taxiway:time_to_first_token_seconds"] == "histogram"
    assert types["taxiway:request_success"] == "counter"
    assert value(gw, "taxiway:request_success_total", finished_reason="length") == 2
    assert value(gw, "taxiway:request_failure_total", code="INVALID_ARGUMENT") == 1
    assert value(gw, "taxiway:prompt_tokens_total", model_name="fake-bytes") == 2 * 12
    assert value(gw, "taxiway:generation_tokens_total") == 2 * 40
    assert check_histogram(gw, "taxiway:time_to_first_token_seconds") == 2
    assert check_histogram(gw, "taxiway:e2e_request_latency_seconds") == 2
    assert check_histogram(gw, "taxiway:inter_token_latency_seconds") >= 2 * 20

    tok, _ = got["tokenizer"]
    assert check_histogram(tok, "taxiway:tokenizer_request_seconds") >= 3 + 2 * 20
    assert value(tok, "taxiway:tokenizer_request_seconds_count", method="Tokenize") == 3

    sched, _ = got["scheduler"]
    assert check_histogram(sched, "taxiway:request_queue_time_seconds") >= 2
    assert value(sched, "taxiway:num_requests_waiting") == 0
    assert value(sched, "taxiway:num_executors") == 1

    ex, _ = got["executor"]
    assert check_histogram(ex, "taxiway:executor_step_seconds") >= 40
    assert value(ex, "taxiway:num_preemptions_total") >= 1
    assert value(ex, "taxiway:prefix_cache_queries_total") >= 2 * 12
    assert value(ex, "taxiway:prefix_cache_hits_total") >= 12  # the second prompt's 3 blocks
    assert value(ex, "taxiway:num_requests_running") == 0
    assert value(ex, "process_cpu_seconds_total") > 0
