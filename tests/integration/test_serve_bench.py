"""`taxiway bench serve`: fixed-ISL/OSL workloads through a real gateway (fake engine) and through
the engine in-process; every request accounted for, percentiles and goodput reported, no NaN."""

from __future__ import annotations

import json
import math

import pytest

from taxiway.serve_bench import RequestRecord, ServeBenchConfig, make_workload, run_benchmark, summarize
from tests.tiny_models import tiny_checkpoints, tiny_llama  # noqa: F401

pytestmark = pytest.mark.timeout(180)


def test_workload_is_poisson_or_all_at_once():
    cfg = ServeBenchConfig(num_requests=2000, isl=3, request_rate=50.0)
    w = make_workload(cfg, vocab_size=1000, seed=1)
    gaps = [b - a for a, b in zip(w.send_at, w.send_at[1:])]
    assert w.send_at[0] == 0 and all(g >= 0 for g in gaps)
    assert abs(sum(gaps) / len(gaps) - 1 / 50) < 0.002  # mean gap 1/rate
    assert all(len(p) == 3 and all(100 <= t < 900 for t in p) for p in w.prompts)
    burst = make_workload(ServeBenchConfig(num_requests=5), vocab_size=1000, seed=1)
    assert burst.send_at == [0.0] * 5
    assert make_workload(cfg, 1000, seed=1) == w  # reproducible


def test_each_run_can_send_its_own_count():
    cfg = ServeBenchConfig(num_requests=(2, 7), concurrency=(1, 64), isl=3)
    assert [len(make_workload(cfg, 1000, seed=1, run=i).prompts) for i in (0, 1)] == [2, 7]
    with pytest.raises(ValueError, match="2 counts for 3 concurrency values"):
        ServeBenchConfig(num_requests=(2, 7), concurrency=(1, 8, 64))


def test_client_processes_share_the_concurrency_exactly():
    from taxiway.serve_clients import split_concurrency

    assert split_concurrency(1, 4, 16) == [1]  # concurrency 1 stays one request in flight
    assert split_concurrency(6, 4, 100) == [2, 2, 1, 1]
    assert split_concurrency(64, 4, 256) == [16] * 4
    assert split_concurrency(0, 4, 100) == [0] * 4 and split_concurrency(0, 4, 2) == [0] * 2


def test_summary_counts_tokens_and_times():
    records = [RequestRecord(start=0.0, chunk_times=[0.1, 0.2, 0.4], num_tokens=4),
               RequestRecord(start=0.0, chunk_times=[0.3, 0.5], num_tokens=2),
               RequestRecord(start=0.0, error="UNAVAILABLE: x")]
    run = summarize(records, ServeBenchConfig(slo_ttft_ms=200, slo_tpot_ms=1000), concurrency=2)
    assert run["ramp_ms"] == 0.0  # both requests of the first wave sent at once
    assert (run["completed"], run["errors"], run["output_tokens"]) == (2, 1, 6)
    assert run["output_tokens_per_s"] == pytest.approx(6 / 0.5)
    assert run["ttft_ms"]["p50"] == pytest.approx(200.0) and run["e2e_ms"]["mean"] == pytest.approx(450.0)
    assert run["goodput_requests_per_s"] == pytest.approx(1 / 0.5)  # only the first meets the TTFT SLO
    assert sorted(run["itl_ms"]) == ["mean", "p50", "p90", "p99"]


@pytest.mark.parametrize("client_processes", [1, 2])
def test_grpc_gateway_runs_every_request(stack_factory, client_processes):
    stack = stack_factory(fake_step_s=0.002)
    cfg = ServeBenchConfig(target="grpc", address=f"127.0.0.1:{stack.gateway.server.port}", isl=8,
                           osl=6, num_requests=24, concurrency=(1, 8), warmup_requests=2,
                           client_processes=client_processes)
    result = run_benchmark(cfg)
    json.dumps(result, allow_nan=False)
    assert [r["concurrency"] for r in result["runs"]] == [1, 8]
    for run in result["runs"]:
        assert (run["completed"], run["errors"], run["output_tokens"]) == (24, 0, 24 * 6), run
        assert run["ttft_ms"]["p50"] > 0 and run["output_tokens_per_s"] > 0
        # the processes start together: the first wave goes out at once (concurrency 1: one request)
        assert 0 <= run["ramp_ms"] < 250, run
    assert result["config"]["request_rate"] == "inf"


@pytest.mark.parametrize("connections", [1, 3])
def test_grpc_connections_take_the_streams_in_turn(stack_factory, monkeypatch, connections):
    """Each of a client's `connections` channels is its own TCP connection (the gateway sees as many
    peers), and the streams go round them in turn."""
    from services.gateway import grpc_api

    peers = []
    generate = grpc_api.GatewayServicer.Generate

    async def counting(self, request, context):
        peers.append(context.peer())
        async for chunk in generate(self, request, context):
            yield chunk

    monkeypatch.setattr(grpc_api.GatewayServicer, "Generate", counting)
    stack = stack_factory(fake_step_s=0.002)
    cfg = ServeBenchConfig(target="grpc", address=f"127.0.0.1:{stack.gateway.server.port}", isl=8,
                           osl=6, num_requests=12, concurrency=(4,), warmup_requests=0,
                           connections=connections)
    result = run_benchmark(cfg)
    assert (result["runs"][0]["completed"], result["runs"][0]["errors"]) == (12, 0)
    assert result["config"]["connections"] == connections
    assert len(peers) == 12 and len(set(peers)) == connections
    assert sorted(peers.count(p) for p in set(peers)) == [12 // connections] * connections
    with pytest.raises(ValueError, match="connections is for target grpc"):
        ServeBenchConfig(target="openai", connections=2)


def test_inprocess_engine_runs_the_same_workload(tiny_llama):
    cfg = ServeBenchConfig(target="inprocess", isl=5, osl=4, num_requests=(6, 3), concurrency=(2, 0),
                           request_rate=200.0, warmup_requests=1,
                           engine={"model": tiny_llama, "device": "cpu", "num_kv_blocks": 64})
    result = run_benchmark(cfg)
    json.dumps(result, allow_nan=False)
    assert [(r["completed"], r["output_tokens"]) for r in result["runs"]] == [(6, 24), (3, 12)]
    for run in result["runs"]:
        assert math.isfinite(run["tpot_ms"]["p99"])
    assert result["target"]["num_kv_blocks"] == 64 and result["target"]["engine"]["model"] == tiny_llama


@pytest.mark.parametrize("target", ["openai", "grpc"])
def test_openai_and_grpc_targets_with_an_api_key(stack_factory, target):
    stack = stack_factory(fake_step_s=0.002, gateway_options={"api_keys": "bench:sk-bench",
                                                              "openai_port": 0})
    port = stack.gateway.http.port if target == "openai" else stack.gateway.server.port
    cfg = ServeBenchConfig(target=target, address=f"127.0.0.1:{port}", isl=8, osl=6,
                           num_requests=16, concurrency=(1, 8), warmup_requests=2,
                           api_key="sk-bench")
    result = run_benchmark(cfg)
    text = json.dumps(result, allow_nan=False)
    assert "sk-bench" not in text and result["config"]["api_key"] == "(given)"
    assert result["target"]["kind"] == target and result["target"]["model"] == "fake-bytes"
    for run in result["runs"]:
        assert (run["completed"], run["errors"], run["output_tokens"]) == (16, 0, 16 * 6), run
        assert run["ttft_ms"]["p50"] > 0 and run["itl_ms"]["p50"] >= 0
    wrong = ServeBenchConfig(**{**cfg.__dict__, "api_key": "sk-wrong", "warmup_requests": 0})
    with pytest.raises(Exception, match="401|UNAUTHENTICATED|not valid"):
        run_benchmark(wrong)
