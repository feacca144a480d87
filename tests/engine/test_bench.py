"""The benchmark drivers on a tiny model on the CPU: throughput through the engine and through
LLM.generate, the max_num_seqs sweep in one process, the latency roofline's byte count, the
api-defaults GPU phase and bench/cpu_step.py's settings and drivers."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from taxiway import benchmarks
from taxiway.benchmarks import BenchConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def cfg(tiny_llama):
    return BenchConfig(isl=12, osl=6, num_requests=10,
                       engine=dict(model=tiny_llama, device="cpu", max_num_seqs=4, async_scheduling=False))


def test_throughput_reports_every_host_part_of_its_steps(cfg):
    result = benchmarks.throughput(cfg)
    assert result["output_tokens_per_s"] > 0 and result["max_num_seqs"] == 4
    decode = result["step_times"]["decode"]
    parts = ("schedule", "prepare", "forward", "sample", "wait", "collect", "update", "output")
    assert all(decode[p + "_ms"] >= 0 for p in parts)
    host = sum(decode[p + "_ms"] for p in parts if p != "wait")
    assert decode["host_ms"] == pytest.approx(host, abs=0.01)
    assert decode["mean_seqs"] <= 4


def test_throughput_through_llm_generate_uses_the_engine_defaults(cfg):
    result = benchmarks.throughput(dataclasses.replace(cfg, api="llm"))
    assert result["api"] == "llm"
    settings = result["engine_settings"]
    assert result["config"]["engine"] == {"model": cfg.engine["model"], **cfg.engine}  # nothing of the bench's
    assert settings["max_num_seqs"] == 4 and settings["max_num_batched_tokens"] == 8192  # given; CPU default
    llm_defaults = benchmarks.throughput(dataclasses.replace(
        cfg, api="llm", engine={k: v for k, v in cfg.engine.items() if k != "max_num_seqs"}))["engine_settings"]
    assert llm_defaults["max_num_seqs"] == 256 and settings["max_num_batched_tokens"] == 8192  # CPU defaults
    assert settings["admission_policy"] == "max_utilization" and settings["detokenize"] is True
    assert settings["v_cache_token_major"] is False  # the cache layout a run used is on record
    assert result["output_tokens_per_s"] > 0


def test_sweep_runs_every_size_in_one_engine(cfg):
    result = benchmarks.sweep(cfg, [2, 4])
    assert [r["max_num_seqs"] for r in result["runs"]] == [2, 4]
    assert all(r["decode_mean_seqs"] <= r["max_num_seqs"] for r in result["runs"])
    assert all(r["decode_host_ms"] > 0 for r in result["runs"])


def test_sweep_refuses_sizes_beyond_the_batch(cfg, tiny_llama):
    from gpu_engine.engine import LLMEngine

    engine = LLMEngine(**cfg.engine_kwargs())
    with pytest.raises(ValueError, match=r"max_num_seqs must be in \[1, 4\]"):
        engine.scheduler.limit_running(5)


def test_bad_bench_settings_are_named():
    with pytest.raises(ValueError, match="api must be one of"):
        BenchConfig(api="curl")
    with pytest.raises(ValueError, match="isl, osl and num_requests must be positive"):
        BenchConfig(osl=0)
    with pytest.raises(ValueError, match=r"unknown engine settings \['max_batch'\]"):
        BenchConfig(engine={"max_batch": 8})


def test_defaults_follow_the_device(monkeypatch):
    """With a GPU the bench runs Llama-3.1-8B dummy with 3000 requests; on the CPU the default
    model with 8; given settings win over both; max_model_len is ISL + OSL unless given."""
    monkeypatch.setattr(benchmarks.torch.cuda, "is_available", lambda: True)
    gpu = BenchConfig(isl=100, osl=28)
    assert gpu.requests == 3000 and gpu.engine_kwargs() == {**benchmarks.GPU_ENGINE_DEFAULTS, "max_model_len": 128}
    monkeypatch.setattr(benchmarks.torch.cuda, "is_available", lambda: False)
    cpu = BenchConfig(engine={"admission_policy": "max_utilization", "max_model_len": 512})
    assert cpu.requests == 8 and "model" not in cpu.engine_kwargs()
    assert cpu.engine_kwargs()["admission_policy"] == "max_utilization" and cpu.engine_kwargs()["max_model_len"] == 512
    assert BenchConfig(engine={"device": "cuda:1"}).on_gpu and BenchConfig(num_requests=5).requests == 5


def test_latency_roofline_counts_one_embedding_row(cfg):
    result = benchmarks.latency(dataclasses.replace(cfg.with_engine(max_num_seqs=1), num_requests=1))
    read = result["bytes_per_token"]
    assert read["embedding_row"] == 64 * 4  # hidden 64, float32: one row, not the table
    assert read["total"] == read["weights"] + read["embedding_row"] + read["kv"]


def test_cli_sweep_writes_one_json(tiny_llama, tmp_path):
    out = tmp_path / "sweep.json"
    proc = subprocess.run(
        [sys.executable, "-m", "taxiway.cli", "bench", "sweep", "--model", tiny_llama, "--device", "cpu",
         "--isl", "8", "--osl", "4", "--num-requests", "6", "--sizes", "2", "3", "--no-async-scheduling",
         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["benchmark"] == "sweep" and [r["max_num_seqs"] for r in result["runs"]] == [2, 3]


def test_gpu_session_api_defaults_phase_runs_the_api_and_the_bench_on_one_workload(tiny_llama, tmp_path):
    """The phase on the CPU with a tiny model: LLM.generate on the engine's defaults and the bench on
    its own settings, each writing its JSON whole."""
    env = {**os.environ, "OUT": str(tmp_path),
           "API_DEFAULTS_ARGS": f"--model {tiny_llama} --device cpu --isl 8 --osl 4 --num-requests 6"}
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "api-defaults"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ran = [line.split() for line in proc.stdout.splitlines() if line.startswith("api-defaults")]
    assert [(r[0], r[1]) for r in ran] == [("api-defaults-llm", "rc=0"), ("api-defaults-bench", "rc=0")], proc.stdout
    api = json.loads((tmp_path / "api-defaults-llm.json").read_text())
    bench = json.loads((tmp_path / "api-defaults-bench.json").read_text())
    assert api["api"] == "llm" and api["engine_settings"]["enable_prefix_caching"] is True
    assert api["engine_settings"]["admission_policy"] == "max_utilization"
    assert bench["engine_settings"]["enable_prefix_caching"] is False
    assert bench["engine_settings"]["admission_policy"] == "guaranteed_no_evict"
    for result in (api, bench):
        assert result["config"]["num_requests"] == 6 and result["output_tokens_per_s"] > 0
        assert result["machine"]["card"] == "cpu" and result["machine"]["commit"]
        assert result["command"].startswith("taxiway bench throughput") and "--isl 8" in result["command"]


@pytest.mark.parametrize("settings, driver, kind", [("bench", "engine", "final"), ("api", "llm", "final"),
                                                   ("bench", "engine", "delta")])
def test_cpu_step_times_the_engine_and_llm_generate_on_either_settings(settings, driver, kind):
    spec = importlib.util.spec_from_file_location("cpu_step", REPO / "bench" / "cpu_step.py")
    cpu_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_step)
    row = cpu_step.measure(16, 20, 6, "cpu", overlap=True, settings=settings, driver=driver, output_kind=kind)
    assert (row["settings"], row["driver"], row["running"], row["output_kind"]) == (settings, driver, 16, kind)
    if kind == "delta":  # every request reported every step: output assembly took time
        assert row["parts"]["output_ms"] > 0
    assert row["host_ms"] > 0 and row["parts"]["update_ms"] >= 0
    if driver == "llm":  # generate ran to the end: every request's max_tokens
        assert row["generated_tokens"] == 16 * (6 + 2 * cpu_step.WARM_STEPS)


def test_awq_dummy_latency_counts_int4_bytes(cfg):
    """`bench latency --quantization awq --load-format dummy`: the roofline reads every linear as
    stored in INT4 (codes, float32 scales and uint8 zero points on the CPU), the rest as before."""
    one = dataclasses.replace(cfg.with_engine(max_num_seqs=1, load_format="dummy"), num_requests=1)
    dense = benchmarks.latency(one)["bytes_per_token"]["weights"]
    result = benchmarks.latency(one.with_engine(quantization="awq"))
    assert result["quantization"].startswith("awq (dummy)") and result["decode_tokens_per_s"] > 0
    saved = 0
    for n, k, g in ((128, 64, 64), (64, 64, 64), (256, 64, 64), (64, 128, 128)):  # qkv, o, gate_up, down
        saved += n * k * 4 - (n * k // 2 + n * (k // g) * (4 + 1))
    assert dense - result["bytes_per_token"]["weights"] == 2 * saved  # 2 layers


def test_cli_throughput_awq_dummy(tiny_llama, tmp_path):
    from taxiway.cli import main

    out = tmp_path / "awq.json"
    rc = main(["bench", "throughput", "--model", tiny_llama, "--device", "cpu", "--load-format", "dummy",
               "--quantization", "awq", "--isl", "8", "--osl", "4", "--num-requests", "6", "--max-num-seqs", "3",
               "--no-async-scheduling", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["quantization"].startswith("awq (dummy)") and result["output_tokens_per_s"] > 0


def test_cli_latency_with_speculation_reports_acceptance(tiny_llama, tmp_path):
    out = tmp_path / "latency.json"
    spec = json.dumps({"method": "draft_model", "num_speculative_tokens": 3, "model": tiny_llama,
                       "disable_when_slower": False})
    proc = subprocess.run(
        [sys.executable, "-m", "taxiway.cli", "bench", "latency", "--model", tiny_llama, "--load-format", "auto",
         "--device", "cpu",
         "--isl", "8", "--osl", "9", "--no-async-scheduling", "--speculative-config", spec, "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["config"]["engine"]["speculative_config"]["method"] == "draft_model"
    sd = result["spec_decode"]  # the target as its own draft: every draft accepted
    assert sd["num_draft_tokens"] > 0 and sd["acceptance_rate"] == 1.0
    assert sd["mean_acceptance_length"] == 4.0
