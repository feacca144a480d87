"""`taxiway serve` as users meet it: a request still running when the gateway stops ends with
FINISH_REASON_CANCELLED (not a raw gRPC cancellation); a second `taxiway serve` fails with one
line naming the busy ports; a `taxiway serve` killed with SIGKILL leaves no redis-server, no tier
process and (after the next start) no folder behind."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from services.common.proto import pb
from services.common.redis_server import find_redis_server, free_port
from tests.integration.svc_stack import ROOT, child_env, wait_for
from tests.integration.test_drain import Background

pytestmark = pytest.mark.timeout(180)


def test_a_request_running_when_the_gateway_stops_ends_cancelled(stack_factory):
    stack = stack_factory(fake_step_s=0.02)
    running = Background(stack.stub, "still going when the server stops", max_tokens=2000)
    wait_for(lambda: len(running.chunks) >= 3, 20, "the stream to start")
    stack.gateway.stop()
    chunks = running.result(20)  # no error: the stream ends normally
    last = chunks[-1]
    assert last.finish_reason == pb.FINISH_REASON_CANCELLED
    assert last.usage.completion_tokens == sum(len(c.token_ids) for c in chunks)
    stack.wait_idle(10)  # the gateway aborted it upstream


def _serve(tmp_path: Path, port: int, name: str) -> tuple[subprocess.Popen, list[str]]:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "fake_engine": True, "metrics_port": 0, "openai_port": 0,
        "tokenizer": {"port": 0}, "scheduler": {"port": 0, "heartbeat_timeout_s": 2.0},
        "executor": {"port": 0, "fake_step_s": 0.001}}))
    env = {**child_env(), "TMPDIR": str(tmp_path)}
    env.pop("TAXIWAY_INTERNAL_TOKEN")
    proc = subprocess.Popen([sys.executable, "-m", "services.serve", "--config", str(config),
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_serve_names_every_busy_port_in_one_line():
    gateway, openai = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    with gateway, openai:
        ports = gateway.getsockname()[1], openai.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "services.serve", "--fake-engine", "--port",
                              str(ports[0]), "--openai-port", str(ports[1])], cwd=ROOT,
                             env=child_env(), capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()
    assert len(err) == 1, err
    named = err[0].split(" are in use: ")[0]
    assert f"127.0.0.1:{ports[0]} (gateway port)" in named, err
    assert f"127.0.0.1:{ports[1]} (gateway openai_port)" in named, err


@pytest.mark.slow
def test_second_serve_names_the_busy_port_and_a_killed_serve_leaves_nothing(tmp_path):
    if find_redis_server() is None:
        pytest.skip("no redis-server binary for the embedded Redis")
    port = free_port()
    first, lines = _serve(tmp_path, port, "first")
    try:
        wait_for(lambda: any("taxiway is serving at" in l for l in lines), 120, "the first serve")
        second = subprocess.run([sys.executable, "-m", "services.serve", "--fake-engine",
                                 "--port", str(port)], cwd=ROOT, env=child_env(),
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        # one line naming every busy port: the gateway's, and any other default port that one of the
        # first serve's (kernel-chosen) ports happens to hold
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and " in use: " in err[0], err
        assert f"127.0.0.1:{port} (gateway port)" in err[0].split(" in use: ")[0], err
        children = _children(first.pid)
        names = {Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0")[0].rsplit(b"/", 1)[-1]
                 for c in children}
        assert any(n.startswith(b"redis-server") for n in names) and len(children) == 5, names
        run = tmp_path / "taxiway-serve" / str(first.pid)
        assert run.is_dir()
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        wait_for(lambda: not any(_alive(c) for c in children), 10,
                 "every child of the killed serve to die")
    finally:
        if first.poll() is None:
            first.kill()
    again, lines = _serve(tmp_path, port, "again")  # the port is free again at once
    try:
        wait_for(lambda: any("taxiway is serving at" in l for l in lines), 120, "the next serve")
        assert not run.exists()  # the killed run's folder went with the next start
    finally:
        again.send_signal(signal.SIGINT)
        assert again.wait(60) == 0
    assert not (tmp_path / "taxiway-serve" / str(again.pid)).exists()
