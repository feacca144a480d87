"""Runs one tier in this process until SIGINT/SIGTERM (or until the `taxiway serve` parent that
started it is gone)."""

from __future__ import annotations

import logging
import os
import signal
import threading

from services.common.config import ROLES

log = logging.getLogger("taxiway.serve")
PARENT_ENV = "TAXIWAY_PARENT_PID"


def start_role(role: str, config):
    """Starts the tier; returns its stop function."""
    if role == "tokenizer":
        from services.tokenizer.service import build

        return build(config).stop
    if role == "gateway":
        from services.gateway.service import GatewayService as cls
    elif role == "scheduler":
        from services.scheduler.service import SchedulerService as cls
    elif role == "executor":
        from services.executor.service import ExecutorService as cls
    else:
        raise ValueError(f"unknown role {role!r}; one of {ROLES}")
    return cls(config).start().stop


def run_role(role: str, config) -> int:
    stop_requested = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_requested.set())
    parent = int(os.environ.get(PARENT_ENV, "0"))
    stop = start_role(role, config)
    while not stop_requested.wait(0.5):
        if parent and os.getppid() != parent:
            log.warning("%s: the taxiway serve parent is gone; stopping", role)
            break
    log.info("%s stopping", role)
    stop()
    return 0
