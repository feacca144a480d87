"""services.common.metrics: names, label sets and text format; separate registries; HTTP server."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.common import metrics as mx

MODEL = "SmolLM2-135M-Instruct"


def families(registry) -> dict:
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def taxiway_families(registry) -> dict:
    return {name: f for name, f in families(registry).items() if name.startswith("taxiway:")}


def label_sets(family) -> set[tuple[str, ...]]:
    return {tuple(sorted(s.labels)) for s in family.samples if not s.name.endswith("_created")}


# family name (as the text parser reports it: counters without _total) -> (type, labels)
EXPECTED = {
    mx.GatewayMetrics: {
        "taxiway:time_to_first_token_seconds": ("histogram", {"model_name"}),
        "taxiway:inter_token_latency_seconds": ("histogram", {"model_name"}),
        "taxiway:e2e_request_latency_seconds": ("histogram", {"model_name"}),
        "taxiway:prompt_tokens": ("counter", {"model_name"}),
        "taxiway:generation_tokens": ("counter", {"model_name"}),
        "taxiway:request_success": ("counter", {"model_name", "finished_reason"}),
        "taxiway:request_failure": ("counter", {"model_name", "code"}),
    },
    mx.TokenizerMetrics: {
        "taxiway:tokenizer_request_seconds": ("histogram", {"model_name", "method"}),
    },
    mx.SchedulerMetrics: {
        "taxiway:num_requests_waiting": ("gauge", {"model_name"}),
        "taxiway:request_queue_time_seconds": ("histogram", {"model_name"}),
        "taxiway:num_executors": ("gauge", {"model_name"}),
    },
    mx.ExecutorMetrics: {
        "taxiway:num_requests_running": ("gauge", {"model_name"}),
        "taxiway:kv_cache_usage_perc": ("gauge", {"model_name"}),
        "taxiway:prefix_cache_queries": ("counter", {"model_name"}),
        "taxiway:prefix_cache_hits": ("counter", {"model_name"}),
        "taxiway:num_preemptions": ("counter", {"model_name"}),
        "taxiway:kernel_compiles_after_start": ("counter", {"model_name"}),
        "taxiway:executor_step_seconds": ("histogram", {"model_name"}),
        "taxiway:spec_decode_num_drafts": ("counter", {"model_name"}),
        "taxiway:spec_decode_num_draft_tokens": ("counter", {"model_name"}),
        "taxiway:spec_decode_num_accepted_tokens": ("counter", {"model_name"}),
        "taxiway:spec_decode_num_accepted_tokens_per_pos": ("counter", {"model_name", "position"}),
    },
}


def exercise(bundle) -> None:
    """Touch every labelled family once so each renders samples."""
    if isinstance(bundle, mx.GatewayMetrics):
        bundle.request_failed("RESOURCE_EXHAUSTED")
    if isinstance(bundle, mx.TokenizerMetrics):
        bundle.observe("Tokenize", 0.0003)
    if isinstance(bundle, mx.ExecutorMetrics):
        bundle.spec_decode(1, 3, 2, [1, 1])


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_names_types_and_label_sets(cls):
    bundle = cls(MODEL)
    exercise(bundle)
    got = taxiway_families(bundle.registry)
    assert set(got) == set(EXPECTED[cls])
    for name, (kind, labels) in EXPECTED[cls].items():
        assert got[name].type == kind, name
        sample_labels = label_sets(got[name])
        if kind == "histogram":
            assert sample_labels >= {tuple(sorted(labels | {"le"})), tuple(sorted(labels))}, name
        else:
            assert sample_labels == {tuple(sorted(labels))}, name


def test_text_format_has_vllm_style_series():
    gw = mx.GatewayMetrics(MODEL)
    gw.time_to_first_token.observe(0.03)
    gw.inter_token_latency.observe(0.004)
    gw.request_finished(prompt_tokens=12, generation_tokens=30, finished_reason="stop", e2e_s=1.2)
    text = generate_latest(gw.registry).decode()
    assert "# TYPE taxiway:time_to_first_token_seconds histogram" in text
    assert f'taxiway:time_to_first_token_seconds_bucket{{le="0.04",model_name="{MODEL}"}} 1.0' in text
    assert f'taxiway:time_to_first_token_seconds_count{{model_name="{MODEL}"}} 1.0' in text
    assert f'taxiway:prompt_tokens_total{{model_name="{MODEL}"}} 12.0' in text
    assert f'taxiway:generation_tokens_total{{model_name="{MODEL}"}} 30.0' in text
    assert f'taxiway:request_success_total{{finished_reason="stop",model_name="{MODEL}"}} 1.0' in text
    # the other reasons exist from the start at zero, so rate() works before the first one
    assert f'taxiway:request_success_total{{finished_reason="length",model_name="{MODEL}"}} 0.0' in text
    assert f'taxiway:e2e_request_latency_seconds_sum{{model_name="{MODEL}"}} 1.2' in text


def test_buckets_are_sorted_and_distinct():
    for buckets in (mx.TTFT_BUCKETS, mx.ITL_BUCKETS, mx.REQUEST_LATENCY_BUCKETS, mx.QUEUE_TIME_BUCKETS,
                    mx.STEP_BUCKETS, mx.TOKENIZER_BUCKETS):
        assert list(buckets) == sorted(set(buckets))


def test_executor_values():
    ex = mx.ExecutorMetrics(MODEL)
    ex.num_requests_running.set(5)
    ex.kv_cache_usage.set(0.25)
    ex.prefix_cache_lookup(queried_tokens=100, hit_tokens=64)
    ex.num_preemptions.inc()
    ex.step_seconds.observe(0.004)
    got = {s.name: s.value for f in taxiway_families(ex.registry).values() for s in f.samples}
    assert got["taxiway:num_requests_running"] == 5
    assert got["taxiway:kv_cache_usage_perc"] == 0.25
    assert got["taxiway:prefix_cache_queries_total"] == 100
    assert got["taxiway:prefix_cache_hits_total"] == 64
    assert got["taxiway:num_preemptions_total"] == 1
    assert got["taxiway:executor_step_seconds_count"] == 1


# EngineStats of an executor with one request and nothing else going on.
IDLE_STATS = {"num_total_blocks": 8, "num_free_blocks": 8, "block_size": 16, "num_running": 1, "num_waiting": 0,
              "prefill_backlog_tokens": 0, "prefix_cache_queries": 0, "prefix_cache_hits": 0, "num_preemptions": 0}


def test_executor_spec_decode_counters_follow_the_engine_stats():
    from gpu_engine.outputs import EngineStats
    from services.executor.observe import StepMetrics

    ex = mx.ExecutorMetrics(MODEL)
    steps = StepMetrics(ex)
    steps.sample(EngineStats(**IDLE_STATS, spec_num_drafts=2, spec_num_draft_tokens=6, spec_num_accepted_tokens=3,
                             spec_num_accepted_tokens_per_pos=(2, 1, 0)))
    steps.sample(EngineStats(**IDLE_STATS, spec_num_drafts=3, spec_num_draft_tokens=10, spec_num_accepted_tokens=7,
                             spec_num_accepted_tokens_per_pos=(3, 2, 1, 1)))
    text = generate_latest(ex.registry).decode()
    assert f'taxiway:spec_decode_num_drafts_total{{model_name="{MODEL}"}} 3.0' in text
    assert f'taxiway:spec_decode_num_draft_tokens_total{{model_name="{MODEL}"}} 10.0' in text
    assert f'taxiway:spec_decode_num_accepted_tokens_total{{model_name="{MODEL}"}} 7.0' in text
    for pos, n in enumerate((3, 2, 1, 1)):
        assert (f'taxiway:spec_decode_num_accepted_tokens_per_pos_total{{model_name="{MODEL}",'
                f'position="{pos}"}} {float(n)}') in text


def test_executor_late_kernel_compiles_follow_the_engine_stats():
    from gpu_engine.outputs import EngineStats
    from services.executor.observe import StepMetrics

    ex = mx.ExecutorMetrics(MODEL)
    steps = StepMetrics(ex)
    for late in (0, 2, 2, 5):  # the engine's count since start-up
        steps.sample(EngineStats(**IDLE_STATS, kernel_compiles_late=late))
    text = generate_latest(ex.registry).decode()
    assert f'taxiway:kernel_compiles_after_start_total{{model_name="{MODEL}"}} 5.0' in text


def test_instances_do_not_collide():
    """Two gateways (own registries) in one process; their numbers stay apart."""
    a, b = mx.GatewayMetrics("m"), mx.GatewayMetrics("m")
    a.prompt_tokens.inc(3)
    assert families(a.registry)["taxiway:prompt_tokens"].samples[0].value == 3
    assert families(b.registry)["taxiway:prompt_tokens"].samples[0].value == 0


def test_all_in_one_can_share_one_registry():
    registry = mx.new_registry()
    for cls in EXPECTED:
        cls(MODEL, registry=registry)  # disjoint names: no "Duplicated timeseries" error
    names = set(taxiway_families(registry))
    assert names >= set().union(*(set(v) for v in EXPECTED.values())) - {
        "taxiway:request_failure", "taxiway:tokenizer_request_seconds"}  # those have no sample yet
    assert "process_cpu_seconds" in families(registry) or "python_info" in families(registry)


def test_same_tier_twice_in_one_registry_is_an_error():
    registry = mx.new_registry(process_metrics=False)
    mx.SchedulerMetrics(MODEL, registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        mx.SchedulerMetrics(MODEL, registry=registry)


def test_metrics_server_serves_text_format():
    sched = mx.SchedulerMetrics(MODEL)
    sched.num_requests_waiting.set(7)
    server = mx.start_metrics_server(sched.registry, port=0, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            body = reply.read().decode()
    finally:
        server.close()
    assert f'taxiway:num_requests_waiting{{model_name="{MODEL}"}} 7.0' in body


def test_scheduler_is_leader_gauge_has_no_model_label():
    registry = mx.new_registry(process_metrics=False)
    gauge = mx.scheduler_is_leader_gauge(registry)
    assert registry.get_sample_value("taxiway:scheduler_is_leader") == 0.0
    gauge.set(1)
    assert label_sets(families(registry)["taxiway:scheduler_is_leader"]) == {()}
    assert registry.get_sample_value("taxiway:scheduler_is_leader") == 1.0
    mx.SchedulerMetrics(MODEL, registry=registry)  # both live in the scheduler's one registry
