"""Runs one tier in this process until SIGTERM/SIGINT (or until the `taxiway serve` parent that
started it is gone), then drains it: NOT_SERVING, new calls UNAVAILABLE, running requests finish
within the tier's drain_timeout_s, exit 0. A second signal stops at once. A service that cannot
go on after start-up says why in its `failed` attribute (an exception; None while it is well): the
process then stops it and exits 1 with that one line."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time

from services.common.config import ROLES

log = logging.getLogger("taxiway.serve")
PARENT_ENV = "TAXIWAY_PARENT_PID"


class Signals:
    """SIGTERM and SIGINT as two events: `first` (drain) and `second` (stop now)."""

    def __init__(self) -> None:
        self.first = threading.Event()
        self.second = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, *_) -> None:
        (self.second if self.first.is_set() else self.first).set()


def start_role(role: str, config):
    """Starts the tier; returns the service, which has drain(timeout_s, interrupted) and stop()."""
    if role == "tokenizer":
        from services.tokenizer.service import TokenizerService as cls
    elif role == "gateway":
        from services.gateway.service import GatewayService as cls
    elif role == "scheduler":
        from services.scheduler.service import SchedulerService as cls
    elif role == "executor":
        from services.executor.service import ExecutorService as cls
    else:
        raise ValueError(f"unknown role {role!r}; one of {ROLES}")
    return cls(config).start()


def freeze_startup_heap() -> None:
    """Moves every object alive now (modules, the model, the servers) out of the garbage
    collector's reach, as vLLM's engine does after start-up: a full collection then walks only
    what serving made since. Measured in the gateway's per-token benchmark (bench/serve_tiers.py,
    256 streams): the longest full collection stalled its event loop 161 ms; 17 ms after this."""
    gc.collect()
    gc.freeze()


def run_role(role: str, config) -> int:
    signals = Signals()
    parent = int(os.environ.get(PARENT_ENV, "0"))
    try:
        service = start_role(role, config)
    except OSError as exc:  # a port in use: one line, not a traceback
        print(f"taxiway serve --role {role}: {exc}", file=sys.stderr)
        return 1
    freeze_startup_heap()
    parent_gone, failed = False, None
    while not signals.first.wait(0.5):
        failed = getattr(service, "failed", None)
        if failed is not None:
            print(f"taxiway serve --role {role}: {failed}", file=sys.stderr)
            break
        if parent and os.getppid() != parent:
            log.warning("%s: the taxiway serve parent is gone; stopping", role)
            parent_gone = True
            break
    if not (parent_gone or failed):
        drain(role, service, config.drain_timeout_s, signals.second)
    log.info("%s stopping", role)
    service.stop()
    return 1 if failed else 0


def drain(role: str, service, timeout_s: float, interrupted: threading.Event) -> bool:
    log.info("%s draining: admitting nothing more, finishing what runs (up to %.0fs)",
             role, timeout_s)
    t0 = time.monotonic()
    done = service.drain(timeout_s, interrupted)
    if done:
        log.info("%s drained in %.1fs", role, time.monotonic() - t0)
    else:
        log.warning("%s: requests still running after %.1fs; stopping anyway", role,
                    time.monotonic() - t0)
    return done
