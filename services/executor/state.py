"""The executor's published state: a versioned board that the step loop writes after each step and
any number of WatchState streams read, each at its own pace."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import replace

from services.common.types import Ended, ExecutorState, KvEvent


class StateBoard:
    """Latest scalars plus a bounded log of per-version events (finished ids, KV changes, ended
    requests).

    A reader passes the version it has seen; it gets the events since then merged into one state,
    or a full snapshot when it is new or fell behind the log. A full snapshot lists the running
    requests, every cached block, and the last `log_size` requests that ended on their own.
    """

    def __init__(self, executor_id: str, log_size: int = 4096):
        self._cond = threading.Condition()
        self._version = 0
        self._log: deque[tuple[int, tuple[str, ...], tuple[KvEvent, ...], tuple[Ended, ...]]] = \
            deque(maxlen=log_size)
        self._state = ExecutorState(executor_id)
        self._running: frozenset[str] = frozenset()
        self._cached: dict[bytes, None] = {}
        self._ended: deque[Ended] = deque(maxlen=log_size)

    def publish(self, state: ExecutorState, finished: list[str], kv_events: list[KvEvent],
                running: frozenset[str], ended: list[Ended] = ()) -> None:
        with self._cond:
            self._version += 1
            self._log.append((self._version, tuple(finished), tuple(kv_events), tuple(ended)))
            self._ended.extend(ended)
            self._state = replace(state, seq=self._version)
            self._running = running
            for e in kv_events:
                if e.stored:
                    self._cached[e.block_hash] = None
                else:
                    self._cached.pop(e.block_hash, None)
            self._cond.notify_all()

    @property
    def version(self) -> int:
        return self._version

    def read(self, seen: int | None, timeout: float) -> tuple[ExecutorState, int]:
        """The state after version `seen` (None: a full snapshot at once); after `timeout` seconds
        without a change, the same state again (a heartbeat)."""
        with self._cond:
            if seen is not None:
                self._cond.wait_for(lambda: self._version > seen, timeout)
            oldest = self._log[0][0] if self._log else self._version + 1
            if seen is None or seen + 1 < oldest:
                return replace(self._state, full=True, running_request_ids=tuple(self._running),
                               kv_events=tuple(KvEvent(True, h) for h in self._cached),
                               ended=tuple(self._ended)), self._version
            finished, kv, ended = [], [], []
            for version, f, k, e in reversed(self._log):  # newest first; stop at what was seen
                if version <= seen:
                    break
                finished[:0] = f
                kv[:0] = k
                ended[:0] = e
            return replace(self._state, finished_request_ids=tuple(finished),
                           kv_events=tuple(kv), ended=tuple(ended)), self._version
