"""What `taxiway serve` leaves behind when it is killed: nothing. Its children (the tier processes,
the embedded redis-server) get SIGKILL from the kernel when it dies, however it dies
(PR_SET_PDEATHSIG), and its files live in a folder per run that the next run removes when the run
that made it is gone. Also the check that its ports are free, before anything starts."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

PR_SET_PDEATHSIG = 1
RUNS_DIR = "taxiway-serve"


def die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A Popen preexec_fn: the child gets SIGKILL when the thread that started it (the parent's
    main thread) exits, and exits at once if the parent is already gone. Linux only; elsewhere a
    no-op (the tiers still watch their parent's pid)."""
    def preexec() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent_pid:  # it died between fork and prctl
            os._exit(1)

    return preexec


def run_dir(base: str | None = None) -> Path:
    """A fresh folder for this run's files, <tmp>/taxiway-serve/<pid>; folders of runs whose
    process is gone (killed) are removed first."""
    root = Path(base or tempfile.gettempdir()) / RUNS_DIR
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.name.isdigit() and not _alive(int(entry.name)):
            shutil.rmtree(entry, ignore_errors=True)
    mine = root / str(os.getpid())
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir(mode=0o700)
    return mine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def busy_ports(ports: Iterable[tuple[str, str, int]]) -> list[str]:
    """Of (what, host, port), the ones that something listens on already, as 'host:port (what)'.
    Port 0 (a free one) is skipped."""
    busy = []
    for what, host, port in ports:
        if port <= 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                busy.append(f"{host}:{port} ({what})")
    return busy
