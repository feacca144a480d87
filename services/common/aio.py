"""An asyncio event loop in a thread of its own, for the tiers that serve on grpc.aio (the gateway,
the tokenizer) while their owner (`taxiway serve --role ...`, the tests) stays synchronous:

    loop = LoopThread("gateway")
    loop.run(service.astart())          # from any other thread: runs it there, returns its result
    loop.submit(coro)                   # fire and forget (a Future)
    loop.stop()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=f"{name}-loop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Runs `coro` on the loop and waits for its result (from another thread only)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.run() called from its own loop: await the coroutine")
        return self.submit(coro).result(timeout)

    def call(self, fn, *args) -> None:
        """Calls fn(*args) on the loop soon (thread-safe)."""
        self.loop.call_soon_threadsafe(fn, *args)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancels what still runs on the loop, then stops it."""
        if not self._thread.is_alive():
            return

        async def cancel_rest() -> None:
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self.run(cancel_rest(), timeout)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
