"""Per-request mailboxes: the output-stream reader drops each delta into its request's mailbox;
the request's task waits on it. Everything here runs on the gateway's event loop (no locks).

Mailboxes are keyed by the internal request id, which the gateway makes for every request (never
reused), so a late delta of an ended request finds no mailbox. A request with n samples is n
internal ids sharing one mailbox. A caller's own request ids are claims scoped to that caller:
"already in flight" is only ever said to the caller that holds it."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.common.types import Delta

REISSUE = object()
"""Put into every mailbox when Redis restarted: what it held may be gone; submit again."""
SHUTDOWN = object()
"""Put into every mailbox when the gateway stops: each request ends as cancelled."""


@dataclass(frozen=True)
class Failed:
    """Put into every mailbox when the request cannot go on (Redis lost): raise `error`."""

    error: Exception


TIMER_SLACK_S = 0.01
"""A wait may end this much after its timeout: the timer armed for the previous wait is kept
unless it would fire later than that (each wait asks for the same deadline, give or take the
clocks' drift)."""


class Mailbox:
    """A queue that hands over everything it holds at once (so a request that fell behind sends
    its queued deltas as one chunk), woken by one future: no task or thread per wait.

    The timeout's timer outlives a wait: a request waits on its mailbox once per chunk, always
    for the same deadline, and arming and cancelling a loop timer per chunk was a sixth of the
    gateway's time per token at 256 streams (bench/serve_tiers.py)."""

    def __init__(self) -> None:
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expiry = 0.0
        """Loop time at which the current wait times out."""

    def put(self, item: Delta | object) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get_all(self, timeout: float) -> list | None:
        """Every item queued (deltas, REISSUE, SHUTDOWN, Failed), waiting up to `timeout`
        seconds for the first; None when none came."""
        if not self._items:
            loop = asyncio.get_running_loop()
            self._expiry = loop.time() + max(0.0, timeout)
            if self._timer is None or self._timer.when() > self._expiry + TIMER_SLACK_S:
                self._arm(loop, self._expiry)
            self._waiter = waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
            if not self._items:
                return None
        items = list(self._items)
        self._items.clear()
        return items

    def close(self) -> None:
        """The request is over: its timer goes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wakes the wait whose time is up; a later wait (a longer timeout) is timed anew."""
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return
        if loop.time() >= self._expiry:
            self._waiter.set_result(None)
        else:
            self._arm(loop, self._expiry)


class Router:
    def __init__(self) -> None:
        self._boxes: dict[str, Mailbox] = {}
        self._claims: dict[tuple[str, str], str] = {}
        """(caller, the caller's request id) -> the first internal id, while in flight."""
        self._claim_of: dict[str, tuple[str, str]] = {}

    def open(self, request_ids: str | Sequence[str],
             claim: tuple[str, str] | None = None) -> Mailbox | None:
        """One new mailbox for the internal id(s) (a request's samples); None when `claim`
        (caller, the caller's own id) is already in flight for that caller."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for rid in ids:
            if rid in self._boxes:
                raise ValueError(f"internal request id {rid!r} is in use")
        if claim is not None:
            if claim in self._claims:
                return None
            self._claims[claim] = ids[0]
            self._claim_of[ids[0]] = claim
        box = Mailbox()
        for rid in ids:
            self._boxes[rid] = box
        return box

    def close(self, request_ids: str | Iterable[str]) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            box = self._boxes.pop(rid, None)
            if box is not None:
                box.close()
            claim = self._claim_of.pop(rid, None)
            if claim is not None:
                del self._claims[claim]

    def dispatch(self, deltas: Iterable[Delta]) -> None:
        for d in deltas:
            box = self._boxes.get(d.request_id)
            if box is not None:  # unknown: finished or cancelled already
                box.put(d)

    def broadcast(self, item: object) -> int:
        """Puts `item` into every open mailbox (once per request); returns how many."""
        boxes = {id(b): b for b in self._boxes.values()}
        for box in boxes.values():
            box.put(item)
        return len(boxes)

    def __len__(self) -> int:
        return len(self._boxes)
