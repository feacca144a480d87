"""bench/scrape_metrics.py: it reads a tier's taxiway: series while a benchmark runs and sums up the
window (histogram means from _sum/_count deltas, counter increases, gauge mean and max)."""

import json
import threading
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from bench.scrape_metrics import main, parse, summarize
from services.common.redis_server import free_port


def test_parse_sums_label_sets_and_leaves_buckets_out():
    page = ('# HELP x\ntaxiway:num_requests_running{model_name="a"} 3.0\n'
            'taxiway:num_requests_running{model_name="b"} 2.0\n'
            'taxiway:executor_step_seconds_bucket{le="0.01"} 4.0\n'
            'taxiway:executor_step_seconds_sum 0.5\ntaxiway:executor_step_seconds_count 10.0\n'
            'process_cpu_seconds_total 9.0\n')
    assert parse(page) == {"taxiway:num_requests_running": 5.0, "taxiway:executor_step_seconds_sum": 0.5,
                           "taxiway:executor_step_seconds_count": 10.0}


def test_summarize_reads_histograms_counters_and_gauges_over_the_window():
    rows = [{"taxiway:s_sum": 1.0, "taxiway:s_count": 10.0, "taxiway:g": 4.0, "taxiway:c_total": 5.0},
            {"taxiway:s_sum": 2.0, "taxiway:s_count": 20.0, "taxiway:g": 8.0, "taxiway:c_total": 9.0},
            {"taxiway:s_sum": 4.0, "taxiway:s_count": 30.0, "taxiway:g": 6.0, "taxiway:c_total": 12.0}]
    got = summarize(rows)
    assert got["taxiway:s"] == {"count": 20.0, "mean": 0.15}  # 3 s over 20 observations
    assert got["taxiway:c_total"] == {"increase": 7.0}
    assert got["taxiway:g"] == {"mean": 6.0, "max": 8.0}
    assert summarize([]) == {}


def test_it_samples_a_live_endpoint_until_its_duration_and_counts_a_dead_one(tmp_path):
    registry = CollectorRegistry()
    running = Gauge("taxiway:num_requests_running", "", registry=registry)
    steps = Histogram("taxiway:executor_step_seconds", "", registry=registry)
    tokens = Counter("taxiway:generation_tokens", "", registry=registry)
    port, dead = free_port("127.0.0.1"), free_port("127.0.0.1")
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    done = threading.Event()

    def load():
        while not done.is_set():
            running.set(7)
            steps.observe(0.02)
            tokens.inc(3)
            time.sleep(0.02)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        out = tmp_path / "m.json"
        assert main(["--url", f"executor=http://127.0.0.1:{port}/metrics", "--url",
                     f"gone=http://127.0.0.1:{dead}/metrics", "--interval-s", "0.1", "--duration-s", "0.8",
                     "--out", str(out)]) == 0
    finally:
        done.set()
        worker.join()
        server.shutdown()
    r = json.loads(out.read_text())
    ex = r["tiers"]["executor"]
    assert len(r["samples"]["executor"]) >= 4 and r["unreachable"] == {"executor": 0, "gone": len(r["samples"]["executor"])}
    assert ex["taxiway:executor_step_seconds"]["count"] > 0
    assert abs(ex["taxiway:executor_step_seconds"]["mean"] - 0.02) < 1e-9
    assert ex["taxiway:num_requests_running"]["max"] == 7.0
    assert ex["taxiway:generation_tokens_total"]["increase"] > 0
    assert r["tiers"]["gone"] == {}
