"""Admission of calls into a tier, for start-up and graceful drain.

Every tier's gRPC servicer sits behind a `Gate`: while the tier starts (model loading, connecting)
and again once it drains (SIGTERM), new calls get UNAVAILABLE (`NotReady`) and health reports
NOT_SERVING; calls already inside run to their end. The gate counts them, so a drain can wait
until the tier is idle, bounded by its grace period:

    gate = Gate("tokenizer")
    server = GrpcServer(..., {"Tokenizer": GatedServicer(gate, always=("GetModelInfo",))})
    gated.target = TokenizerServicer(core); gate.open()       # ready: SERVING
    ...
    gate.close("draining"); gate.wait_idle(30.0)              # SIGTERM
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Iterator

from gpu_engine.errors import NotReady


class Gate:
    """Refuses new calls unless open; counts the calls inside."""

    def __init__(self, tier: str):
        self.tier = tier
        self._cond = threading.Condition()
        self._state = "starting"
        self._busy = 0

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    @property
    def busy(self) -> int:
        """Calls inside now."""
        return self._busy

    def open(self) -> None:
        with self._cond:
            self._state = "open"

    def close(self, state: str = "draining") -> None:
        """From now on new calls get UNAVAILABLE ("<tier> is <state>")."""
        with self._cond:
            self._state = state

    def enter(self) -> None:
        """Raises NotReady unless open; else counts one call in (pair with leave())."""
        with self._cond:
            if self._state != "open":
                raise NotReady(f"{self.tier} is {self._state}")
            self._busy += 1

    def leave(self) -> None:
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float, interrupted: threading.Event | None = None) -> bool:
        """True once no call is inside, False after `timeout` seconds or once `interrupted`."""
        return wait_until(lambda: self._busy == 0, timeout, interrupted)


def wait_until(predicate: Callable[[], bool], timeout: float,
               interrupted: threading.Event | None = None, poll_s: float = 0.05) -> bool:
    """Polls `predicate` until it holds (True), `timeout` passes or `interrupted` is set (False)."""
    stop = interrupted or threading.Event()
    deadline = time.monotonic() + timeout
    while not predicate():
        left = deadline - time.monotonic()
        if left <= 0 or stop.wait(min(poll_s, left)):
            return False
    return True


class GatedServicer:
    """Stands in for a tier's servicer (`target`, set once it exists): each call passes the gate.
    Methods named in `always` skip the gate once the target is set (they serve a drain itself,
    e.g. the executor's Abort and WatchState). Streaming calls stay counted until the stream ends."""

    def __init__(self, gate: Gate, always: tuple[str, ...] = (), target: object = None):
        self.gate = gate
        self.target = target
        self._always = frozenset(always)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def call(request, context):
            if name in self._always and self.target is not None:
                return getattr(self.target, name)(request, context)
            self.gate.enter()
            try:
                result = getattr(self.target, name)(request, context)
            except BaseException:
                self.gate.leave()
                raise
            if inspect.isgenerator(result):
                return _counted(result, self.gate)
            self.gate.leave()
            return result

        return call


class AioGatedServicer(GatedServicer):
    """GatedServicer for grpc.aio servers: the target's methods are coroutines or async
    generators; each call returns one of them (register with add_service(..., aio=True))."""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def call(request, context):
            fn = getattr(self.target, name, None) if self.target is not None else None
            if fn is not None and inspect.isasyncgenfunction(fn):
                return self._stream(fn, name, request, context)
            return self._unary(fn, name, request, context)

        return call

    async def _unary(self, fn, name: str, request, context):
        if name in self._always and fn is not None:
            return await fn(request, context)
        self.gate.enter()
        try:
            return await fn(request, context)
        finally:
            self.gate.leave()

    async def _stream(self, fn, name: str, request, context):
        if name in self._always:
            async for item in fn(request, context):
                yield item
            return
        self.gate.enter()
        try:
            async for item in fn(request, context):
                yield item
        finally:
            self.gate.leave()


def _counted(stream: Iterator, gate: Gate) -> Iterator:
    try:
        yield from stream
    finally:
        gate.leave()


def is_draining_error(exc) -> bool:
    """A call another tier refused because it is draining (UNAVAILABLE "<tier> is draining")."""
    import grpc

    return (getattr(exc, "code", None) is not None and exc.code() is grpc.StatusCode.UNAVAILABLE
            and " is draining" in (exc.details() or ""))
