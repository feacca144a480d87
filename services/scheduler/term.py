"""One term of leadership: what the scheduler that holds the leader lock runs.

It finds the executors in Redis and watches their state streams, learns from their first
(full) states what they already run and what ended while nobody led, then reads the request
stream: its own unacknowledged entries (a restart with the same id), then every entry a former
leader left unacknowledged (the lock proves that leader gone), then new ones. It carries out
SchedulerCore's actions: Admit / Abort over gRPC, notices to gateways, XACK. One thread owns the
core; the others only feed it events.

The fence: nothing reaches another tier once the lease is no longer valid (`LeaderLock.valid`),
which ends a fraction of the lock's TTL before another scheduler can take it. A term then only
waits to be stopped; the next one starts again from Redis and the executors, with a fresh core.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import grpc
import redis
from opentelemetry import trace

from services.common import convert, errors, server, streams
from services.common.drain import is_draining_error
from services.common.metrics import SchedulerMetrics
from services.common.observe import model_label
from services.common.proto import Stub, pb
from services.common.types import Abort, Delta
from services.scheduler.config import SchedulerConfig
from services.scheduler.core import AbortOn, Ack, Action, Admit, Notify, SchedulerCore
from services.scheduler.leader import LeaderLock
from services.scheduler.observe import Admissions
from services.scheduler.policy import CapacityPolicy

log = logging.getLogger(__name__)
READ_BLOCK_MS = 500
TICK_S = 0.2
ADMIT_TIMEOUT_S = 5.0


class Term:
    """start() begins in its own thread (`started` is set once it reads requests); stop() ends
    every thread of the term and closes its channels."""

    def __init__(self, config: SchedulerConfig, scheduler_id: str, lease: LeaderLock, *,
                 redis_client: redis.Redis, reader_redis: redis.Redis, tracer: trace.Tracer,
                 metrics_for: Callable[[str], SchedulerMetrics], draining: threading.Event):
        self.config = config
        self.scheduler_id = scheduler_id
        self.core = SchedulerCore(
            max_waiting=config.max_waiting,
            capacity=CapacityPolicy(config.kv_watermark, config.max_prefill_backlog_tokens))
        self.lock = threading.Lock()
        """Held while the core handles an event (GetState reads under it)."""
        self.admissions = Admissions(tracer)
        self.started = threading.Event()
        self.failed = threading.Event()
        """Set when the term cannot go on (an unexpected error in its core's thread): the service
        then ends it, and the next term starts afresh from Redis and the executors."""
        self._lease = lease
        self._redis = redis_client
        self._reader_redis = reader_redis
        self._metrics_for = metrics_for
        self._draining = draining
        self._stopping = threading.Event()
        self._events: queue.Queue = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._watchers: list[threading.Thread] = []
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, Stub] = {}
        self._watch_calls: dict[str, object] = {}
        self._lost_at: dict[str, float] = {}
        self._missing: dict[str, float] = {}
        """Executor id -> since when its registration is missing from Redis."""
        self._credential = config.internal_credential()

    @property
    def active(self) -> bool:
        """Not stopped and the lease is valid: it may act on the other tiers."""
        return not self._stopping.is_set() and self._lease.valid

    @property
    def threads(self) -> list[threading.Thread]:
        return [*self._workers, *self._watchers]

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> Term:
        self._spawn(self._begin, "term-start")
        return self

    def _begin(self) -> None:
        try:
            self._handle(("registry", streams.list_executors(self._redis)))
            self._await_first_states(timeout=2 * self.config.heartbeat_timeout_s)
        except Exception:  # noqa: BLE001 - e.g. Redis unreachable: the next term tries again
            log.exception("scheduler %s could not start leading", self.scheduler_id)
            self.failed.set()
            return
        if self._stopping.is_set():
            return
        self._spawn(self._main_loop, "scheduler-main")
        self._spawn(self._read_requests, "request-reader")
        self._spawn(self._discovery_loop, "discovery")
        self.started.set()

    def stop(self) -> None:
        self._stopping.set()
        joined = 0
        while joined < len(self._workers):  # those that open watches (term-start may add some)
            self._workers[joined].join(5)
            joined += 1
        for call in list(self._watch_calls.values()):
            call.cancel()
        for t in list(self._watchers):
            t.join(5)
        for ch in self._channels.values():
            ch.close()
        self.admissions.close()

    def _spawn(self, target, name: str, *args, watcher: bool = False) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        (self._watchers if watcher else self._workers).append(t)
        t.start()

    # -- event sources (their own threads) -----------------------------------------------------------

    def _may_read(self) -> bool:
        return self.active and not self._draining.is_set()

    def _read_requests(self) -> None:
        """Own unacknowledged entries first (a restart with the same id), then every entry other
        consumers left unacknowledged (former leaders: the lock says they are gone), then new
        ones; every claim_idle_s / 2 also entries another consumer read after its lease ended and
        left idle claim_idle_s (a read of a partitioned former leader that landed late). After a
        failed read it reads its own pending entries again (the reply may have been lost with its
        connection), and after NOGROUP (Redis restarted empty) it creates the group again."""
        r, me, cfg = self._reader_redis, self.scheduler_id, self.config
        step, cursor = "own", "0"
        others_claimed = False
        next_sweep = time.monotonic() + cfg.claim_idle_s / 2
        while self._may_read():
            try:
                if step == "own":
                    got = r.xreadgroup(streams.SCHEDULER_GROUP, me,
                                       {streams.REQUESTS_STREAM: cursor}, count=256)
                    entries = got[0][1] if got else []
                    if entries:
                        cursor = entries[-1][0]
                    else:
                        step = "new" if others_claimed else "others"
                elif step == "others":
                    entries = streams.claim_pending(r, me, 0, forget=True)
                    step, others_claimed = "new", True
                    if entries:
                        log.info("scheduler %s took over %d unacknowledged request entries",
                                 me, len(entries))
                elif time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + cfg.claim_idle_s / 2
                    entries = streams.claim_pending(r, me, int(cfg.claim_idle_s * 1000))
                else:
                    got = r.xreadgroup(streams.SCHEDULER_GROUP, me, {streams.REQUESTS_STREAM: ">"},
                                       count=256, block=READ_BLOCK_MS)
                    entries = got[0][1] if got else []
                if not self._may_read():
                    return  # fenced or draining meanwhile: they stay pending for the next reader
                for entry_id, fields in entries:  # fields is empty for an entry trimmed away
                    self._events.put(("entry", entry_id.decode(),
                                      (fields or {}).get(streams.FIELD, b"")))
            except Exception as exc:  # noqa: BLE001 - Redis hiccup: back off and read again
                if not self._may_read():
                    return
                if streams.is_nogroup(exc):  # Redis restarted empty: the group is gone
                    log.warning("the consumer group of %s is gone (Redis restarted empty?); "
                                "creating it again", streams.REQUESTS_STREAM)
                    self._ensure_group()
                else:
                    log.warning("reading %s failed: %s", streams.REQUESTS_STREAM, exc)
                    self._stopping.wait(0.5)
                step, cursor = "own", "0"  # a read whose reply was lost left them pending

    def _ensure_group(self) -> None:
        try:
            streams.ensure_group(self._reader_redis)
        except Exception as exc:  # noqa: BLE001 - the next read tries again
            log.warning("could not create the consumer group: %s", exc)
            self._stopping.wait(0.5)

    def _discovery_loop(self) -> None:
        while not self._stopping.wait(self.config.discovery_interval_s):
            try:
                self._events.put(("registry", streams.list_executors(self._redis)))
            except Exception:  # noqa: BLE001
                log.exception("executor discovery failed")

    def _on_registry(self, registered: dict[str, dict], now: float) -> list[Action]:
        actions: list[Action] = []
        for eid, info in registered.items():
            recently_lost = now - self._lost_at.get(eid, -1e18) < self.config.heartbeat_timeout_s
            if eid not in self._watch_calls and not recently_lost:
                self.core.executor_found(eid, info["address"], now)
                self._watch(eid, info["address"])
            if self.admissions.metrics is None and info.get("model"):
                self.admissions.metrics = self._metrics_for(model_label(info["model"]))
        for eid in list(self._watch_calls):
            if eid in registered:
                self._missing.pop(eid, None)
                continue
            # its registration expired (missed heartbeats), or Redis restarted empty and it has
            # not registered again yet: lost only if it stays missing
            since = self._missing.setdefault(eid, now)
            if now - since >= self.config.heartbeat_timeout_s:
                del self._missing[eid]
                actions += self._on_lost(eid, "registration expired", now)
        return actions

    def _watch(self, eid: str, address: str) -> None:
        channel = server.channel(address, credential=self._credential,
                                 ca_file=self.config.internal_tls_ca_file)
        self._channels[eid] = channel
        self._stubs[eid] = Stub(channel, "Executor")
        call = self._stubs[eid].WatchState(pb.WatchStateRequest())
        self._watch_calls[eid] = call
        self._spawn(self._watch_loop, f"watch-{eid}", eid, call, watcher=True)

    def _watch_loop(self, eid: str, call) -> None:
        try:
            for msg in call:
                self._events.put(("state", eid, convert.state_from_pb(msg)))
            reason = "state stream ended"
        except grpc.RpcError as exc:
            reason = f"state stream broke: {exc.code().name}"
        if not self._stopping.is_set():
            self._events.put(("lost", eid, reason))

    def _await_first_states(self, timeout: float) -> None:
        """Before reading requests: learn what each executor already runs (after a restart or a
        takeover), and what ended there while nobody followed it."""
        deadline = time.monotonic() + timeout
        pending = set(self._watch_calls)
        while pending and time.monotonic() < deadline and not self._stopping.is_set():
            try:
                event = self._events.get(timeout=0.1)
            except queue.Empty:
                continue
            self._handle(event)
            if event[0] in ("state", "lost"):
                pending.discard(event[1])

    # -- the core's thread ----------------------------------------------------------------------------

    def _main_loop(self) -> None:
        next_tick = time.monotonic()
        while not self._stopping.is_set():
            try:
                event = self._events.get(timeout=TICK_S)
            except queue.Empty:
                event = None
            try:
                if event is not None:
                    self._handle(event)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK_S
                    self._handle(("tick",))
            except Exception:  # noqa: BLE001 - e.g. Redis gone while acknowledging
                log.exception("scheduler %s: handling %s failed; this term ends",
                              self.scheduler_id, event[0] if event else "tick")
                self.failed.set()
                return

    def _handle(self, event: tuple) -> None:
        if not self.active:
            return  # the term is over (fenced or stopping): its state is dropped with it
        now = time.time()
        kind = event[0]
        with self.lock:
            if kind == "entry":
                actions = self._on_entry(event[1], event[2], now)
            elif kind == "state":
                actions = self.core.executor_state(event[2], now)
            elif kind == "registry":
                actions = self._on_registry(event[1], now)
            elif kind == "lost":
                actions = self._on_lost(event[1], event[2], now)
            elif kind == "refused":
                actions = self.core.admit_refused(event[2], event[1])
            else:
                actions = self.core.tick(now)
                for eid in self.core.silent_executors(now, self.config.heartbeat_timeout_s):
                    actions += self._on_lost(eid, "missed heartbeats", now)
        self._run(actions)
        self._gauges()

    def _gauges(self) -> None:
        metrics = self.admissions.metrics
        if metrics is not None:
            metrics.num_requests_waiting.set(self.core.num_waiting)
            metrics.num_executors.set(len(self.core.executors))

    def _on_entry(self, entry_id: str, data: bytes, now: float) -> list[Action]:
        try:
            item = convert.queue_entry_from_bytes(data)
        except Exception as exc:  # noqa: BLE001 - a malformed entry must not stop the queue
            log.error("dropping malformed entry %s: %s", entry_id, exc)
            return [Ack((entry_id,))]
        if isinstance(item, Abort):
            self.admissions.dropped(item.request_id, "aborted")
            return self.core.abort(item.request_id, entry_id)
        self.admissions.received(item, entry_id, now)
        actions = self.core.submit(item, entry_id, now)
        if actions == [Ack((entry_id,))]:  # re-read after it ended (or a duplicate entry)
            self.admissions.dropped(item.request_id, "already over")
        elif self.core.placement_of(item.request_id) and not any(
                isinstance(a, Admit) and a.request.request_id == item.request_id for a in actions):
            self.admissions.dropped(item.request_id, "already running")  # re-read after a restart
        return actions

    def _on_lost(self, eid: str, reason: str, now: float) -> list[Action]:
        if eid not in self._watch_calls:
            return []
        log.warning("executor %s lost (%s); its requests go back to their gateways", eid, reason)
        self._lost_at[eid] = now
        self._missing.pop(eid, None)
        self._watch_calls.pop(eid).cancel()
        stub = self._stubs.pop(eid, None)
        channel = self._channels.pop(eid, None)
        actions = self.core.executor_lost(eid, now)
        lost = [a.delta.request_id for a in actions if isinstance(a, Notify)]
        if stub is not None and lost and self.active:  # best effort: it may only be partitioned
            self._abort(stub, eid, lost)
        if channel is not None:
            channel.close()
        return actions

    def _run(self, actions: list[Action]) -> None:
        if not actions or not self.active:
            return
        notices: dict[str, list[Delta]] = {}
        acks: list[str] = []
        for a in actions:
            if not self.active:
                return  # fenced meanwhile (an Admit can take a while)
            if isinstance(a, Admit):
                self._admit(a)
            elif isinstance(a, AbortOn) and a.executor_id in self._stubs:
                self._abort(self._stubs[a.executor_id], a.executor_id, list(a.request_ids))
            elif isinstance(a, Notify):
                notices.setdefault(a.gateway_id, []).append(a.delta)
                if a.delta.error is not None:
                    self.admissions.dropped(a.delta.request_id, "rejected", a.delta.error[1])
            elif isinstance(a, Ack):
                acks.extend(a.entry_ids)
        pipe = self._redis.pipeline(transaction=False)
        for gateway_id, deltas in notices.items():
            pipe.xadd(streams.out_stream(gateway_id),
                      {streams.FIELD: convert.output_batch_to_bytes("scheduler", deltas)},
                      maxlen=streams.OUT_STREAM_MAXLEN, approximate=True)
        if acks:
            pipe.xack(streams.REQUESTS_STREAM, streams.SCHEDULER_GROUP, *acks)
        if not (notices or acks) or not self.active:
            return
        try:
            pipe.execute()
        except redis.ResponseError as exc:
            if not streams.is_nogroup(exc):
                raise
            # Redis restarted empty: the entries to acknowledge are gone with their group (the
            # notices went out: a pipeline runs every command, whatever one of them answers)
            log.warning("acknowledging %d entries met NOGROUP (Redis restarted empty?)", len(acks))
            streams.ensure_group(self._redis)

    def _admit(self, a: Admit) -> None:
        timeout = min(ADMIT_TIMEOUT_S, self._lease.remaining_s)
        if timeout <= 0 or self._stopping.is_set():
            return  # fenced: the entry stays unacknowledged, and the next leader admits it
        stub = self._stubs.get(a.executor_id)
        request = self.admissions.admitted(a.request, a.executor_id)
        try:
            if stub is None:
                raise ConnectionError("no channel")
            stub.Admit(pb.AdmitRequest(request=convert.engine_request_to_pb(request),
                                       admit_seq=a.admit_seq), timeout=timeout)
        except grpc.RpcError as exc:
            if is_draining_error(exc):  # it admits nothing more: the request waits again
                self._events.put(("refused", a.executor_id, a.request.request_id))
                return
            if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                with self.lock:
                    actions = self.core.admit_failed(a.request.request_id,
                                                     errors.from_rpc_error(exc))
                self._run(actions)
                return
            log.warning("admit of %s on %s failed: %s", a.request.request_id, a.executor_id, exc)
            self._events.put(("lost", a.executor_id, "admit failed"))
        except ConnectionError:
            self._events.put(("lost", a.executor_id, "no channel"))

    @staticmethod
    def _abort(stub: Stub, executor_id: str, request_ids: list[str]) -> None:
        try:
            stub.Abort(pb.AbortRequest(request_ids=request_ids), timeout=1)
        except grpc.RpcError as exc:
            log.info("abort on %s failed (%s); it is going away anyway", executor_id, exc.code())
