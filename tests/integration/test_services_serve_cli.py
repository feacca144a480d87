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


def start_serve(tmp_path, port: int, **sections):
    """`python -m services.serve` on the fake engine with free ports, the gateway on `port`, and
    `sections` added to its YAML file (the environment's TAXIWAY_* settings left out): (process,
    its output lines as they come, an Event set once it says it is serving, the environment)."""
    config = tmp_path / "taxiway.yaml"
    config.write_text(yaml.safe_dump({
        "fake_engine": True,
        "metrics_port": 0,  # every tier's (not 9091-9094, which may be taken here)
        "openai_port": 0,  # not 8000 either
        "tokenizer": {"port": 0},
        "scheduler": {"port": 0, "heartbeat_timeout_s": 2.0},
        "executor": {"port": 0, "fake_step_s": 0.001},
        **sections,
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
    return proc, lines, ready, env


def test_serve_all_then_client_then_ctrl_c(tmp_path):
    if find_redis_server() is None:
        pytest.skip("no redis-server binary for the embedded Redis")
    port = free_port()
    proc, lines, ready, env = start_serve(tmp_path, port)
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


def test_gateway_replicas_share_the_ports_and_each_serves(tmp_path):
    """`gateway_replicas: 2`: two gateway processes listen on the one gRPC port (SO_REUSEPORT);
    connections spread over them, and requests through either complete. The first replica's
    /metrics counts only its own requests: some, not all, of 16 requests on 16 connections (all
    on one replica has odds of 2 in 65,536)."""
    import json
    import urllib.request

    import grpc

    from services.common.proto import Stub, pb

    if find_redis_server() is None:
        pytest.skip("no redis-server binary for the embedded Redis")
    port, metrics = free_port(), free_port()
    proc, lines, ready, _ = start_serve(
        tmp_path, port, gateway={"gateway_replicas": 2, "metrics_port": metrics, "gateway_id": "gw"})
    try:
        assert ready.wait(120), "".join(lines)
        assert any("2 gateway processes share" in l for l in lines), "".join(lines)
        for i in range(16):  # a connection of its own each: the kernel picks a replica per connection
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                req = pb.GenerateRequest(text=f"hello {i}", sampling=pb.SamplingParams(max_tokens=3))
                out = list(Stub(ch, "Gateway").Generate(req, timeout=30))
                assert out[-1].finish_reason == pb.FINISH_REASON_LENGTH
        openai_port = int(next(l for l in lines if "gateway processes share" in l).split()[-1])
        base = f"http://127.0.0.1:{openai_port}/v1"
        model = json.loads(urllib.request.urlopen(f"{base}/models", timeout=10).read())["data"][0]["id"]
        for i in range(4):  # the OpenAI port is shared too: every connection is answered
            body = json.dumps({"model": model, "prompt": f"hi {i}", "max_tokens": 2}).encode()
            req = urllib.request.Request(f"{base}/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            assert json.loads(urllib.request.urlopen(req, timeout=30).read())["choices"][0]["finish_reason"] == "length"
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
        served = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                     if l.startswith("taxiway:request_success_total{"))
        assert 0 < served < 20, served  # of 16 gRPC and 4 HTTP requests
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    assert rc == 0, "".join(lines)
