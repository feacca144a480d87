"""Engine settings given to `taxiway serve` reach the executor's engine, which reports them (and
what it measured at start-up) in its registration; a stopping executor logs its step times."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest
import redis

from services.common import streams
from tests.integration.svc_stack import ROOT, child_env
from tests.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.timeout(120)


def test_serve_engine_flags_reach_the_engine_and_are_reported(tmp_path, redis_url):
    model = tmp_path / "llama"
    make_tiny_checkpoint("llama", model)
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.serve", "--role", "executor", "--port", "0",
         "--metrics-port", "0", "--redis-url", redis_url, "--executor-id", "settings-test",
         "--model", str(model), "--device", "cpu", "--max-num-seqs", "3", "--max-model-len", "200",
         "--block-size", "8", "--num-kv-blocks", "77", "--no-enable-prefix-caching",
         "--gpu-memory-utilization", "0.5", "--admission-policy", "guaranteed_no_evict"],
        cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "settings-test" not in streams.list_executors(r):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        report = streams.list_executors(r)["settings-test"]["engine"]
    finally:
        proc.terminate()
        proc.wait(30)
    settings = report["settings"]
    assert (settings["max_num_seqs"], settings["max_model_len"], settings["block_size"],
            settings["enable_prefix_caching"], settings["gpu_memory_utilization"],
            settings["admission_policy"]) == (3, 200, 8, False, 0.5, "guaranteed_no_evict")
    assert settings["model"] == str(model)
    assert (report["num_kv_blocks"], report["block_size"], report["device"]) == (77, 8, "cpu")


def test_a_stopping_executor_logs_its_engines_step_times(stack_factory, byte_llama, caplog):
    """The same per-kind step breakdown that `taxiway bench` records in-process, so a run behind the
    services can be compared with one in-process."""
    from tests.integration.svc_stack import real_engine

    caplog.set_level(logging.INFO, logger="services.executor.service")
    stack = stack_factory(executors=0)
    executor = stack.add_executor(engine=real_engine(byte_llama))
    stack.wait_executors(1)
    chunks = stack.generate("Hi", max_tokens=5, temperature=0.0, ignore_eos=True)
    assert sum(len(c.token_ids) for c in chunks) == 5
    stack.executors.remove(executor)
    executor.stop()
    lines = [r.getMessage() for r in caplog.records if " step times: " in r.getMessage()]
    assert len(lines) == 1, lines
    summary = json.loads(lines[0].split(" step times: ", 1)[1])
    assert summary == executor.core.engine.step_times.summary()
    assert sum(kind["steps"] for kind in summary.values()) >= 5  # a prefill, then the decodes
