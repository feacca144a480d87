"""bench/serve_tiers.py and bench/serve_hops.py on tiny sizes: every tier measured, every token
accounted for, each hop present and the hops adding up to the TTFT they split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def run_script(name: str, out: Path, *args: str) -> dict:
    subprocess.run([sys.executable, str(ROOT / "bench" / name), "--out", str(out), *args],
                   cwd=ROOT, check=True, capture_output=True, timeout=100)
    return json.loads(out.read_text())


def test_serve_tiers_measures_each_tier(tmp_path):
    r = run_script("serve_tiers.py", tmp_path / "t.json", "--streams", "8", "--osl", "4",
                   "--repeat", "1", "--exchanges", "20", "--device-step-ms", "1")
    for key in ("executor_device_0ms", "executor_device_1ms"):
        ex = r[key]
        assert ex["tokens"] == 32 and ex["steps"] == 4  # one OutputBatch per step reached Redis
        assert ex["published_tok_s"] > 0 and ex["published_us_per_token"] > 0
    assert r["detokenize"]["grpc_us_per_exchange"] > r["detokenize"]["in_place_us_per_exchange"] > 0
    for key in ("gateway_text", "gateway_token_ids"):
        assert (r[key]["tokens"], r[key]["chunks"]) == (32, 32)  # lockstep: a chunk per token


def test_serve_hops_splits_ttft_into_hops(tmp_path):
    r = run_script("serve_hops.py", tmp_path / "h.json", "--requests", "3")
    hops = r["hops_ms_p50"]
    assert list(hops) == ["client_to_gateway", "gateway_intake", "enqueue_to_admitted", "admit_rpc",
                          "engine_first_token", "to_client"]
    assert hops["engine_first_token"] >= 1.0  # the fake engine's 1 ms step
    assert r["hops_sum_ms"] == pytest.approx(r["ttft_ms_p50"], rel=0.5)


def test_serve_itl_measures_the_output_path_and_the_grpc_floor(tmp_path):
    r = run_script("serve_itl.py", tmp_path / "i.json", "--streams", "8", "--step-ms", "5",
                   "--osl", "6", "--rounds", "1")
    run = r["runs"][0]
    assert run["errors"] == 0 and run["streams"] == 8
    assert 1.0 <= run["tokens_per_message"] <= 6.0  # every token streamed, one message or more
    assert run["step_interval_ms"]["p50"] >= 5.0  # the fake engine's step
    assert run["gateway"]["entries_per_xread"]["count"] >= 1
    assert run["gateway"]["items_per_mailbox_handover"]["count"] >= 8
    assert run["cpu_us_per_token"]["gateway_process"] > 0
    floor = run_script("serve_itl.py", tmp_path / "f.json", "--floor", "yield", "--streams", "4",
                       "--step-ms", "5", "--osl", "6", "--rounds", "1")["runs"][0]
    assert floor["errors"] == 0 and floor["tokens_per_message"] == 1.0
    assert floor["server_loop_cpu_us_per_message"] > 0
