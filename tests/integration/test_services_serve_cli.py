"""`taxiway serve` (all four tiers as processes, fake engine, embedded Redis) and `taxiway client`:
it prints where to connect, answers, and stops cleanly on Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
import yaml

from services.common.redis_server import find_redis_server, free_port
from tests.integration.svc_stack import ROOT

pytestmark = pytest.mark.timeout(180)


def test_serve_all_then_client_then_ctrl_c(tmp_path):
    if find_redis_server() is None:
        pytest.skip("no redis-server binary for the embedded Redis")
    port = free_port()
    config = tmp_path / "taxiway.yaml"
    config.write_text(yaml.safe_dump({
        "fake_engine": True,
        "metrics_port": 0,  # every tier's (not 9091-9094, which may be taken here)
        "openai_port": 0,  # not 8000 either
        "tokenizer": {"port": 0},
        "scheduler": {"port": 0, "heartbeat_timeout_s": 2.0},
        "executor": {"port": 0, "fake_step_s": 0.001},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAXIWAY_") and k != "REDIS_URL"}
    env["TAXIWAY_PORT"] = str(port)  # the environment reaches the gateway only
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.serve", "--config", str(config)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if "taxiway is serving at" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert ready.wait(120), "".join(lines)
        assert f"127.0.0.1:{port}" in next(l for l in lines if "serving at" in l)
        client = subprocess.run(
            [sys.executable, "-c", "from taxiway.commands.client import *; import argparse, sys;"
             "p = argparse.ArgumentParser(); add_parser(p.add_subparsers()); "
             "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))",
             "client", "--address", f"127.0.0.1:{port}", "--raw", "--max-tokens", "11",
             "hello world"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stderr
        assert client.stdout == "hello world\n"
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    assert rc == 0, "".join(lines)
    assert any("taxiway: stopped" in l for l in lines)
