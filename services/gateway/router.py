"""Per-request mailboxes: the output-stream reader drops each delta into its request's queue; the
request's handler thread waits on it.

Mailboxes are keyed by the internal request id, which the gateway makes for every request (never
reused), so a late delta of an ended request finds no mailbox. A caller's own request ids are
claims scoped to that caller: "already in flight" is only ever said to the caller that holds it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from services.common.types import Delta

CANCELLED = object()
"""Put into a mailbox when the client went away."""
REISSUE = object()
"""Put into every mailbox when Redis restarted: what it held may be gone; submit again."""


@dataclass(frozen=True)
class Failed:
    """Put into every mailbox when the request cannot go on (Redis lost): raise `error`."""

    error: Exception


class Mailbox:
    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()

    def put(self, item: Delta | object) -> None:
        self._queue.put(item)

    def get(self, timeout: float | None) -> Delta | object | None:
        """The next delta (or CANCELLED, REISSUE, Failed); None after `timeout` seconds without one."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


class Router:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._boxes: dict[str, Mailbox] = {}
        self._claims: dict[tuple[str, str], str] = {}
        """(caller, the caller's request id) -> internal id, while in flight."""
        self._claim_of: dict[str, tuple[str, str]] = {}

    def open(self, request_id: str, claim: tuple[str, str] | None = None) -> Mailbox | None:
        """A new mailbox for internal id `request_id`; None when `claim` (caller, the caller's
        own id) is already in flight for that caller."""
        with self._lock:
            if request_id in self._boxes:
                raise ValueError(f"internal request id {request_id!r} is in use")
            if claim is not None:
                if claim in self._claims:
                    return None
                self._claims[claim] = request_id
                self._claim_of[request_id] = claim
            box = self._boxes[request_id] = Mailbox()
            return box

    def close(self, request_id: str) -> None:
        with self._lock:
            self._boxes.pop(request_id, None)
            claim = self._claim_of.pop(request_id, None)
            if claim is not None:
                del self._claims[claim]

    def dispatch(self, deltas: Iterable[Delta]) -> None:
        with self._lock:
            for d in deltas:
                box = self._boxes.get(d.request_id)
                if box is not None:  # unknown: finished or cancelled already
                    box.put(d)

    def broadcast(self, item: object) -> int:
        """Puts `item` into every open mailbox; returns how many."""
        with self._lock:
            for box in self._boxes.values():
                box.put(item)
            return len(self._boxes)

    def __len__(self) -> int:
        return len(self._boxes)
