"""The scheduler's bookkeeping, without Redis or gRPC: the waiting queue, where each request runs,
and the executors' published state. Every method handles one event and returns the actions the
shell must carry out (admit, abort, notify a gateway, acknowledge stream entries); nothing here
runs per executor step."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from gpu_engine.errors import DeadlineExceeded, Overloaded
from services.common import errors
from services.common.types import Delta, Ended, EngineRequest, ExecutorState
from services.scheduler.policy import CapacityPolicy, ExecutorView, PlacementPolicy, prompt_hashes


@dataclass(frozen=True)
class Admit:
    executor_id: str
    address: str
    request: EngineRequest
    admit_seq: int


@dataclass(frozen=True)
class AbortOn:
    executor_id: str
    address: str
    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class Notify:
    gateway_id: str
    delta: Delta


@dataclass(frozen=True)
class Ack:
    entry_ids: tuple[str, ...]


Action = Admit | AbortOn | Notify | Ack


@dataclass
class _Request:
    request: EngineRequest
    entry_id: str
    executor_id: str | None = None
    lost_at: float | None = None
    """When its executor was lost; the gateway's resubmission is awaited."""
    hashes: dict[int, list[bytes]] = field(default_factory=dict)

    def hashes_for(self, block_size: int) -> list[bytes]:
        if block_size not in self.hashes:
            self.hashes[block_size] = prompt_hashes(self.request, block_size)
        return self.hashes[block_size]


class SchedulerCore:
    def __init__(self, *, max_waiting: int = 1024, capacity: CapacityPolicy | None = None,
                 placement: PlacementPolicy | None = None, orphan_grace_s: float = 30.0,
                 lost_grace_s: float = 60.0):
        self.max_waiting = max_waiting
        self.capacity = capacity or CapacityPolicy()
        self.placement = placement or PlacementPolicy()
        self.orphan_grace_s = orphan_grace_s
        self.lost_grace_s = lost_grace_s
        self.executors: dict[str, ExecutorView] = {}
        self._requests: dict[str, _Request] = {}
        self._heap: list[tuple[int, float, int, str]] = []
        self._waiting: set[str] = set()
        self._orphans: dict[str, tuple[str, float]] = {}
        """Request id -> (executor id, since): running on an executor we have no entry for yet."""
        self._ended: dict[str, tuple[int, float]] = {}
        """Request id -> (attempt, since): ended on an executor on its own while we had no entry
        for it (after a restart or a takeover); its entry, once read, is acknowledged."""
        self._tiebreak = itertools.count()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_requests(self) -> int:
        """Requests waiting or running on an executor (not those awaiting a resubmission)."""
        return sum(1 for r in self._requests.values() if r.lost_at is None)

    def placement_of(self, request_id: str) -> str | None:
        r = self._requests.get(request_id)
        return r.executor_id if r else None

    # -- request events ----------------------------------------------------------------------------

    def submit(self, req: EngineRequest, entry_id: str, now: float) -> list[Action]:
        rid = req.request_id
        known = self._requests.get(rid)
        if known is not None:
            if req.attempt <= known.request.attempt:  # the same entry read twice
                return [] if entry_id == known.entry_id else [Ack((entry_id,))]
            actions: list[Action] = [Ack((known.entry_id,))]
            actions += self._unplace(known)
            self._waiting.discard(rid)
        else:
            actions = []
        ended = self._ended.pop(rid, None)
        if ended is not None and rid not in self._orphans and ended[0] >= req.attempt:
            return actions + [Ack((entry_id,))]  # it ran to its end while no scheduler followed it
        if req.deadline is not None and req.deadline <= now:
            return actions + self._reject(req, entry_id, DeadlineExceeded(
                f"request {rid} passed its deadline while queued"))
        orphan = self._orphans.pop(rid, None)
        record = _Request(req, entry_id)
        self._requests[rid] = record
        if orphan is not None and orphan[0] in self.executors:
            if req.attempt == 0:
                self._place(record, self.executors[orphan[0]])  # it ran on while we restarted
                return actions
            # an older attempt runs there unfollowed (Redis restarted and its gateway submitted
            # again): stop it first; the executor applies this before any Admit sent after it
            actions.append(self._abort_on(self.executors[orphan[0]], [rid]))
        if len(self._waiting) >= self.max_waiting and req.attempt == 0:
            del self._requests[rid]
            return actions + self._reject(req, entry_id, Overloaded(
                f"the queue is full ({self.max_waiting} requests waiting); retry later"))
        self._enqueue(record)
        return actions + self.schedule()

    def abort(self, request_id: str, entry_id: str) -> list[Action]:
        actions: list[Action] = [Ack((entry_id,))]
        record = self._requests.pop(request_id, None)
        if record is not None:
            self._waiting.discard(request_id)
            actions.append(Ack((record.entry_id,)))
            actions += self._unplace(record)
        return actions + self.schedule()

    def admit_failed(self, request_id: str, exc: Exception) -> list[Action]:
        """The executor refused the request itself (bad input): it fails, nothing is retried."""
        record = self._requests.pop(request_id, None)
        if record is None:
            return []
        view = self.executors.get(record.executor_id or "")
        if view is not None:
            view.requests.discard(request_id)
        return self._reject(record.request, record.entry_id, exc)

    def admit_refused(self, request_id: str, executor_id: str) -> list[Action]:
        """The executor refused the admission because it is draining: it gets nothing more, and
        the request waits again at its place in the queue."""
        view = self.executors.get(executor_id)
        if view is not None:
            view.draining = True
            view.requests.discard(request_id)
            for seq in [s for s, r in view.reserved.items() if r[0] == request_id]:
                del view.reserved[seq]
        record = self._requests.get(request_id)
        if record is not None and record.executor_id == executor_id:
            record.executor_id = None
            self._enqueue(record)
        return self.schedule()

    def tick(self, now: float) -> list[Action]:
        """Timers: deadlines of waiting requests, executors gone silent, orphans, lost requests."""
        actions: list[Action] = []
        for rid in [r for r in self._waiting if self._expired(self._requests[r].request, now)]:
            record = self._requests.pop(rid)
            self._waiting.discard(rid)
            actions += self._reject(record.request, record.entry_id,
                                    DeadlineExceeded(f"request {rid} passed its deadline while queued"))
        for rid, (eid, since) in list(self._orphans.items()):
            if now - since > self.orphan_grace_s:
                del self._orphans[rid]
                if eid in self.executors:
                    actions.append(self._abort_on(self.executors[eid], [rid]))
        for rid in [r for r, (_, since) in self._ended.items() if now - since > self.orphan_grace_s]:
            del self._ended[rid]
        for rid, record in list(self._requests.items()):
            if record.lost_at is not None and now - record.lost_at > self.lost_grace_s:
                del self._requests[rid]  # its gateway never resubmitted: gone too
                actions.append(Ack((record.entry_id,)))
        return actions + self.schedule()

    # -- executor events -----------------------------------------------------------------------------

    def executor_found(self, executor_id: str, address: str, now: float) -> None:
        self.executors[executor_id] = ExecutorView(executor_id, address, last_seen=now)

    def executor_state(self, state: ExecutorState, now: float) -> list[Action]:
        view = self.executors.get(state.executor_id)
        if view is None:
            return []
        view.state = state
        view.last_seen = now
        view.draining = view.draining or state.draining  # a draining executor never comes back
        view.admit_seq = max(view.admit_seq, state.last_admit_seq)
        for seq in [s for s in view.reserved if s <= state.last_admit_seq]:
            del view.reserved[seq]
        if state.full:
            view.cached = set()
        for e in state.kv_events:
            (view.cached.add if e.stored else view.cached.discard)(e.block_hash)
        actions: list[Action] = []
        followed = set()
        for rid in state.finished_request_ids:
            record = self._requests.get(rid)
            if record is not None and record.executor_id == view.executor_id:
                del self._requests[rid]
                view.requests.discard(rid)
                actions.append(Ack((record.entry_id,)))
                followed.add(rid)
            elif self._orphans.get(rid, ("",))[0] == view.executor_id:
                del self._orphans[rid]  # it no longer runs there
        actions += self._settle_ended([e for e in state.ended if e.request_id not in followed], now)
        if state.full:
            actions += self._reconcile(view, set(state.running_request_ids), now)
        return actions + self.schedule()

    def executor_lost(self, executor_id: str, now: float) -> list[Action]:
        """Its requests go back to their gateways, which resubmit them with what they streamed."""
        view = self.executors.pop(executor_id, None)
        if view is None:
            return []
        actions: list[Action] = []
        for rid in sorted(view.requests):
            record = self._requests[rid]
            record.executor_id, record.lost_at = None, now
            req = record.request
            actions.append(Notify(req.gateway_id, Delta(rid, req.attempt, executor_lost=True)))
        return actions + self.schedule()

    def silent_executors(self, now: float, timeout_s: float) -> list[str]:
        return [e for e, v in self.executors.items() if now - v.last_seen > timeout_s]

    # -- admission -----------------------------------------------------------------------------------

    def schedule(self) -> list[Action]:
        """Admits waiting requests in (priority, arrival) order while the head fits somewhere."""
        actions: list[Action] = []
        while self._heap:
            _, _, _, rid = self._heap[0]
            record = self._requests.get(rid)
            if rid not in self._waiting or record is None:
                heapq.heappop(self._heap)
                continue
            fits = [f for v in self.executors.values() if v.ready
                    if (f := self.capacity.fit(v, record.request,
                                               record.hashes_for(v.state.block_size))) is not None]
            choice = self.placement.choose(fits)
            if choice is None:
                break
            heapq.heappop(self._heap)
            self._waiting.discard(rid)
            view = choice.view
            seq = self._place(record, view)
            view.reserved[seq] = (rid, choice.blocks,
                                  len(record.request.prompt_token_ids) - choice.hit_blocks
                                  * view.state.block_size)
            actions.append(Admit(view.executor_id, view.address, record.request, seq))
        return actions

    # -- helpers -------------------------------------------------------------------------------------

    def _enqueue(self, record: _Request) -> None:
        req = record.request
        self._waiting.add(req.request_id)
        heapq.heappush(self._heap, (req.priority, req.arrival_time, next(self._tiebreak),
                                    req.request_id))

    def _place(self, record: _Request, view: ExecutorView) -> int:
        record.executor_id, record.lost_at = view.executor_id, None
        view.requests.add(record.request.request_id)
        view.num_admitted += 1
        view.admit_seq += 1
        return view.admit_seq

    def _unplace(self, record: _Request) -> list[Action]:
        view = self.executors.get(record.executor_id or "")
        record.executor_id = None
        if view is None:
            return []
        view.requests.discard(record.request.request_id)
        return [self._abort_on(view, [record.request.request_id])]

    def _reconcile(self, view: ExecutorView, running: set[str], now: float) -> list[Action]:
        """After a full snapshot: requests we placed there that it does not hold are lost; requests
        it holds that belong elsewhere are aborted; unknown ones may be claimed by a replay."""
        actions: list[Action] = []
        missing = sorted(view.requests - running)
        for rid in missing:
            record = self._requests[rid]
            record.executor_id, record.lost_at = None, now
            view.requests.discard(rid)
            req = record.request
            actions.append(Notify(req.gateway_id, Delta(rid, req.attempt, executor_lost=True)))
        stale = []
        for rid in running - view.requests:
            record = self._requests.get(rid)
            if record is None:
                self._orphans[rid] = (view.executor_id, now)
            elif rid in self._waiting and record.request.attempt == 0:
                self._waiting.discard(rid)
                self._place(record, view)
            else:
                stale.append(rid)
        if stale:
            actions.append(self._abort_on(view, sorted(stale)))
        return actions

    def _settle_ended(self, ended: list[Ended], now: float) -> list[Action]:
        """Requests that ended on an executor on their own and that we did not follow there (we
        restarted or took over): acknowledge a waiting one, remember one we have not read yet."""
        actions: list[Action] = []
        for e in ended:
            record = self._requests.get(e.request_id)
            if record is None:
                self._ended[e.request_id] = (e.attempt, now)
            elif (e.request_id in self._waiting and record.lost_at is None
                  and e.attempt >= record.request.attempt):
                del self._requests[e.request_id]
                self._waiting.discard(e.request_id)
                actions.append(Ack((record.entry_id,)))
        return actions

    def _reject(self, req: EngineRequest, entry_id: str, exc: Exception) -> list[Action]:
        delta = Delta(req.request_id, req.attempt, error=errors.to_wire(exc))
        return [Notify(req.gateway_id, delta), Ack((entry_id,))]

    @staticmethod
    def _abort_on(view: ExecutorView, request_ids: list[str]) -> AbortOn:
        return AbortOn(view.executor_id, view.address, tuple(request_ids))

    @staticmethod
    def _expired(req: EngineRequest, now: float) -> bool:
        return req.deadline is not None and req.deadline <= now
