"""Per-request mailboxes: the output-stream reader drops each delta into its request's queue; the
request's handler thread waits on it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable

from services.common.types import Delta

CANCELLED = object()
"""Put into a mailbox when the client went away."""


class Mailbox:
    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()

    def put(self, item: Delta | object) -> None:
        self._queue.put(item)

    def get(self, timeout: float | None) -> Delta | object | None:
        """The next delta (or CANCELLED); None after `timeout` seconds without one."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


class Router:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._boxes: dict[str, Mailbox] = {}

    def open(self, request_id: str) -> Mailbox | None:
        """A new mailbox, or None when the id is already in flight."""
        with self._lock:
            if request_id in self._boxes:
                return None
            box = self._boxes[request_id] = Mailbox()
            return box

    def close(self, request_id: str) -> None:
        with self._lock:
            self._boxes.pop(request_id, None)

    def dispatch(self, deltas: Iterable[Delta]) -> None:
        with self._lock:
            for d in deltas:
                box = self._boxes.get(d.request_id)
                if box is not None:  # unknown: finished or cancelled already
                    box.put(d)

    def __len__(self) -> int:
        return len(self._boxes)
