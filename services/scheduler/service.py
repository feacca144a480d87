"""The scheduler tier's shell: reads taxiway:requests through the consumer group, finds executors
in Redis, watches their state streams, and runs SchedulerCore's actions (Admit / Abort over gRPC,
notices to gateways, XACK). One thread owns the core; the others only feed it events."""

from __future__ import annotations

import logging
import queue
import threading
import time

import grpc

from opentelemetry import trace

from services.common import convert, errors, server, streams
from services.common.drain import is_draining_error, wait_until
from services.common.metrics import SchedulerMetrics
from services.common.observe import TierObservability, model_label
from services.common.proto import Stub, pb
from services.common.server import GrpcServer
from services.common.types import Abort, Delta
from services.scheduler.config import SchedulerConfig
from services.scheduler.core import AbortOn, Ack, Action, Admit, Notify, SchedulerCore
from services.scheduler.observe import Admissions
from services.scheduler.policy import CapacityPolicy

log = logging.getLogger(__name__)
READ_BLOCK_MS = 500
TICK_S = 0.2


class SchedulerServicer:
    def __init__(self, service: SchedulerService):
        self._service = service

    def GetState(self, request, context):
        with self._service.lock:
            core = self._service.core
            views = [pb.ExecutorView(
                executor_id=v.executor_id, address=v.address, num_requests=len(v.requests),
                num_admitted=v.num_admitted,
                num_free_blocks=v.state.num_free_blocks if v.state else 0,
                num_total_blocks=v.state.num_total_blocks if v.state else 0)
                for v in core.executors.values()]
            return pb.SchedulerState(num_waiting=core.num_waiting, executors=views)


class SchedulerService:
    """start(): reads the request stream and admits. drain(): NOT_SERVING, stops reading the
    request stream (new entries stay there for another scheduler, or for this one's restart), and
    keeps admitting what it had read and following it until every request is over."""

    def __init__(self, config: SchedulerConfig, *,
                 tracer_provider: trace.TracerProvider | None = None):
        self.config = config
        self._provider = tracer_provider
        self.core = SchedulerCore(
            max_waiting=config.max_waiting,
            capacity=CapacityPolicy(config.kv_watermark, config.max_prefill_backlog_tokens))
        self.lock = threading.Lock()
        self._events: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._draining = threading.Event()
        self._threads: list[threading.Thread] = []
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, Stub] = {}
        self._watch_calls: dict[str, object] = {}
        self._lost_at: dict[str, float] = {}

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> SchedulerService:
        if not self.config.redis_url:
            raise ValueError("the scheduler needs --redis-url (or REDIS_URL)")
        self.obs = TierObservability("scheduler", host=self.config.host,
                                     metrics_port=self.config.metrics_port,
                                     tracer_provider=self._provider)
        self.admissions = Admissions(self.obs.tracer)
        self.server = GrpcServer(self.config.host, self.config.port,
                                 {"Scheduler": SchedulerServicer(self)},
                                 max_workers=self.config.max_workers).start()
        self.redis = streams.connect(self.config.redis_url)
        self.reader_redis = streams.connect(self.config.redis_url)
        streams.ensure_group(self.redis)
        self._handle(("registry", streams.list_executors(self.redis)))
        self._await_first_states(timeout=2 * self.config.heartbeat_timeout_s)
        self._spawn(self._main_loop, "scheduler-main")
        self._spawn(self._read_requests, "request-reader")
        self._spawn(self._discovery_loop, "discovery")
        self.server.set_serving(True)
        log.info("scheduler %s serving on %s", self.config.scheduler_id, self.server.address)
        return self

    def drain(self, timeout_s: float, interrupted: threading.Event | None = None) -> bool:
        """True when every request it had read was over within timeout_s."""
        self._draining.set()
        self.server.set_serving(False)
        return wait_until(lambda: self.core.num_requests == 0, timeout_s, interrupted)

    def stop(self) -> None:
        self._draining.set()
        self._stopping.set()
        for call in list(self._watch_calls.values()):
            call.cancel()
        self.server.stop(1.0)
        for t in self._threads:
            t.join(5)
        for ch in self._channels.values():
            ch.close()
        self.admissions.close()
        self.obs.close()

    def _spawn(self, target, name: str, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # -- event sources (their own threads) -----------------------------------------------------------

    def _read_requests(self) -> None:
        """Own unacknowledged entries first (a restart), then entries other schedulers left idle,
        then new ones."""
        r, cfg = self.reader_redis, self.config
        pending = "0"  # cursor through our own unacknowledged entries; None once done
        while not self._draining.is_set():
            try:
                if pending is not None:
                    got = r.xreadgroup(streams.SCHEDULER_GROUP, cfg.scheduler_id,
                                       {streams.REQUESTS_STREAM: pending}, count=256)
                    entries = got[0][1] if got else []
                    if entries:
                        pending = entries[-1][0]
                    else:
                        pending = None
                        _, entries, *_ = r.xautoclaim(
                            streams.REQUESTS_STREAM, streams.SCHEDULER_GROUP, cfg.scheduler_id,
                            min_idle_time=int(cfg.claim_idle_s * 1000), count=1024)
                else:
                    got = r.xreadgroup(streams.SCHEDULER_GROUP, cfg.scheduler_id,
                                       {streams.REQUESTS_STREAM: ">"}, count=256, block=READ_BLOCK_MS)
                    entries = got[0][1] if got else []
                for entry_id, fields in entries:  # fields is empty for an entry trimmed away
                    self._events.put(("entry", entry_id.decode(), (fields or {}).get(streams.FIELD, b"")))
            except Exception:  # noqa: BLE001 - Redis hiccup: back off and read again
                if self._draining.is_set():
                    return
                log.exception("reading %s failed", streams.REQUESTS_STREAM)
                self._stopping.wait(1.0)

    def _discovery_loop(self) -> None:
        while not self._stopping.wait(self.config.discovery_interval_s):
            try:
                self._events.put(("registry", streams.list_executors(self.redis)))
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
                self.admissions.metrics = SchedulerMetrics(model_label(info["model"]),
                                                           registry=self.obs.registry)
        for eid in list(self._watch_calls):
            if eid not in registered:  # its registration expired: missed heartbeats
                actions += self._on_lost(eid, "registration expired", now)
        return actions

    def _watch(self, eid: str, address: str) -> None:
        channel = server.channel(address)
        self._channels[eid] = channel
        self._stubs[eid] = Stub(channel, "Executor")
        call = self._stubs[eid].WatchState(pb.WatchStateRequest())
        self._watch_calls[eid] = call
        self._spawn(self._watch_loop, f"watch-{eid}", eid, call)

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
        """Before reading requests: learn what each executor already runs (after a restart)."""
        deadline = time.monotonic() + timeout
        pending = set(self._watch_calls)
        while pending and time.monotonic() < deadline:
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
            if event is not None:
                self._handle(event)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_S
                self._handle(("tick",))

    def _handle(self, event: tuple) -> None:
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
        if self.core.placement_of(item.request_id) and not any(
                isinstance(a, Admit) and a.request.request_id == item.request_id for a in actions):
            self.admissions.dropped(item.request_id, "already running")  # re-read after a restart
        return actions

    def _on_lost(self, eid: str, reason: str, now: float) -> list[Action]:
        if eid not in self._watch_calls:
            return []
        log.warning("executor %s lost (%s); its requests go back to their gateways", eid, reason)
        self._lost_at[eid] = now
        self._watch_calls.pop(eid).cancel()
        stub = self._stubs.pop(eid, None)
        channel = self._channels.pop(eid, None)
        actions = self.core.executor_lost(eid, now)
        lost = [a.delta.request_id for a in actions if isinstance(a, Notify)]
        if stub is not None and lost:  # best effort: a partitioned executor may still run them
            self._abort(stub, eid, lost)
        if channel is not None:
            channel.close()
        return actions

    def _run(self, actions: list[Action]) -> None:
        notices: dict[str, list[Delta]] = {}
        acks: list[str] = []
        for a in actions:
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
        pipe = self.redis.pipeline(transaction=False)
        for gateway_id, deltas in notices.items():
            pipe.xadd(streams.out_stream(gateway_id),
                      {streams.FIELD: convert.output_batch_to_bytes("scheduler", deltas)},
                      maxlen=streams.OUT_STREAM_MAXLEN, approximate=True)
        if acks:
            pipe.xack(streams.REQUESTS_STREAM, streams.SCHEDULER_GROUP, *acks)
        if notices or acks:
            pipe.execute()

    def _admit(self, a: Admit) -> None:
        stub = self._stubs.get(a.executor_id)
        request = self.admissions.admitted(a.request, a.executor_id)
        try:
            if stub is None:
                raise ConnectionError("no channel")
            stub.Admit(pb.AdmitRequest(request=convert.engine_request_to_pb(request),
                                       admit_seq=a.admit_seq), timeout=5)
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
