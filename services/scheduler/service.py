"""The scheduler tier's shell: the leader lock, and the term of leadership it runs while it holds
it (services/scheduler/term.py: executors, the request stream, admission).

Every scheduler serves GetState and reports SERVING; only the one that holds the leader lock
(`taxiway:scheduler:leader`) admits. The lease thread acquires the lock while standing by (every
ttl/5), renews it while leading (every ttl/3), and ends the term when a renewal says the lock is
lost or when none succeeded for ttl - ttl/4 (the term's fence has stopped it by then already).
"""

from __future__ import annotations

import logging
import threading

from opentelemetry import trace

from services.common import streams
from services.common.drain import wait_until
from services.common.metrics import SchedulerMetrics, scheduler_is_leader_gauge
from services.common.observe import TierObservability
from services.common.proto import pb
from services.common.server import GrpcServer, ServerSecurity
from services.scheduler.config import SchedulerConfig
from services.scheduler.leader import LeaderLock
from services.scheduler.term import READ_BLOCK_MS, Term

log = logging.getLogger(__name__)
REDIS_TIMEOUT_S = 5.0
"""Longest wait for a Redis reply on the term's connections (the stream read adds its block)."""


class SchedulerServicer:
    def __init__(self, service: SchedulerService):
        self._service = service

    def GetState(self, request, context):
        svc = self._service
        state = pb.SchedulerState(scheduler_id=svc.scheduler_id, leader_id=svc.leader_id or "")
        term = svc.term
        if term is None:
            return state
        state.is_leader = True
        with term.lock:
            core = term.core
            state.num_waiting = core.num_waiting
            state.executors.extend(pb.ExecutorView(
                executor_id=v.executor_id, address=v.address, num_requests=len(v.requests),
                num_admitted=v.num_admitted,
                num_free_blocks=v.state.num_free_blocks if v.state else 0,
                num_total_blocks=v.state.num_total_blocks if v.state else 0)
                for v in core.executors.values())
        return state


class SchedulerService:
    """start(): serves, and leads or stands by. drain(): NOT_SERVING, stops reading the request
    stream (new entries stay there for the next leader), keeps admitting what it had read and
    following it until every request is over, then hands the lock back. stop(): ends the term
    and hands the lock back at once."""

    def __init__(self, config: SchedulerConfig, *,
                 tracer_provider: trace.TracerProvider | None = None):
        self.config = config
        self.scheduler_id = config.resolved_id()
        self.term: Term | None = None
        """The current term while this scheduler leads; None on standby."""
        self.leader_id: str | None = None
        """Who held the lock when this scheduler last looked."""
        self._provider = tracer_provider
        self._term_mutex = threading.Lock()
        self._stopping = threading.Event()
        self._draining = threading.Event()
        self._first_round = threading.Event()
        self._metrics: SchedulerMetrics | None = None
        ttl = config.leader_ttl_s
        self._renew_s, self._poll_s = ttl / 3, ttl / 5

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> SchedulerService:
        cfg = self.config
        if not cfg.redis_url:
            raise ValueError("the scheduler needs --redis-url (or REDIS_URL)")
        self.obs = TierObservability("scheduler", host=cfg.host, metrics_port=cfg.metrics_port,
                                     tracer_provider=self._provider)
        self.is_leader_gauge = scheduler_is_leader_gauge(self.obs.registry)
        self.server = GrpcServer(cfg.host, cfg.port, {"Scheduler": SchedulerServicer(self)},
                                 max_workers=cfg.max_workers,
                                 security=ServerSecurity.internal(cfg)).start()
        auth = cfg.redis_options()
        self.redis = streams.connect(cfg.redis_url, REDIS_TIMEOUT_S, **auth)
        # no retry inside a read: a reply lost with its connection leaves entries pending for us,
        # which the reader then reads again from its own pending list
        self.reader_redis = streams.connect(cfg.redis_url, READ_BLOCK_MS / 1000 + REDIS_TIMEOUT_S,
                                            retries=0, **auth)
        streams.ensure_group(self.redis)
        # its own connection: a reply may take a quarter of the TTL, and one retry at most
        self.lease_redis = streams.connect(cfg.redis_url, cfg.leader_ttl_s / 4, retries=1, **auth)
        self.lease = LeaderLock(self.lease_redis, self.scheduler_id, ttl_s=cfg.leader_ttl_s)
        self._lease_thread = threading.Thread(target=self._lease_loop, name="leader-lease",
                                              daemon=True)
        self._lease_thread.start()
        self._first_round.wait(cfg.leader_ttl_s)
        term = self.term
        if term is not None:  # it leads: serve once it reads requests, as a lone scheduler did
            wait_until(lambda: term.started.is_set() or term.failed.is_set(),
                       2 * cfg.heartbeat_timeout_s + 1)
        self.server.set_serving(True)
        log.info("scheduler %s serving on %s (%s)", self.scheduler_id, self.server.address,
                 "leader" if term is not None else f"standby; {self.leader_id or 'nobody'} leads")
        return self

    def drain(self, timeout_s: float, interrupted: threading.Event | None = None) -> bool:
        """True when every request it had read was over within timeout_s."""
        self._draining.set()  # the reader stops, and a standby never takes the lock
        self.server.set_serving(False)
        done = wait_until(lambda: (t := self.term) is None or t.core.num_requests == 0,
                          timeout_s, interrupted)
        if done:
            self._resign("drained", logging.INFO)
        return done

    def stop(self) -> None:
        self._draining.set()
        self._stopping.set()
        self._lease_thread.join(self.config.leader_ttl_s)
        self._resign("stopping", logging.INFO)
        self.server.stop(1.0)
        self.obs.close()

    # -- leadership (the lease thread) ---------------------------------------------------------------

    def _lease_loop(self) -> None:
        while not self._stopping.is_set():
            term = self.term
            try:
                wait = self._try_to_lead() if term is None else self._keep_leading(term)
            except Exception:  # noqa: BLE001 - the lease thread must not die
                log.exception("scheduler %s: leader election failed", self.scheduler_id)
                wait = self._poll_s
            self._first_round.set()
            self._stopping.wait(wait)

    def _try_to_lead(self) -> float:
        if self._draining.is_set():
            return self._poll_s
        try:
            won = self.lease.acquire()
        except Exception as exc:  # noqa: BLE001 - Redis may come back
            log.warning("scheduler %s cannot reach Redis for the leader lock: %s",
                        self.scheduler_id, exc)
            return self._poll_s
        if won:
            self._begin_term()
            return self._renew_s
        if self.lease.holder != self.leader_id:
            log.info("scheduler %s stands by; %s leads", self.scheduler_id, self.lease.holder)
        self.leader_id = self.lease.holder
        return self._poll_s

    def _keep_leading(self, term: Term) -> float:
        if not self.lease.valid:
            self._resign(f"the leader lock went unrenewed for "
                         f"{self.lease.ttl_s - self.lease.fence_margin_s:.1f}s (fenced)")
            return self._poll_s
        if term.failed.is_set():
            self._resign("its term failed (logged above); it starts again from Redis")
            return self._poll_s
        try:
            held = self.lease.renew()
        except Exception as exc:  # noqa: BLE001 - the fence decides when to give up
            log.warning("scheduler %s could not renew the leader lock (%s); it stops admitting in "
                        "%.1fs unless a renewal succeeds", self.scheduler_id, exc,
                        self.lease.remaining_s)
            return min(self._poll_s, self.lease.remaining_s)
        if not held:
            self._end_term("another scheduler holds the leader lock")
            return self._poll_s
        return min(self._renew_s, self.lease.remaining_s)

    def _begin_term(self) -> None:
        term = Term(self.config, self.scheduler_id, self.lease, redis_client=self.redis,
                    reader_redis=self.reader_redis, tracer=self.obs.tracer,
                    metrics_for=self._metrics_for, draining=self._draining)
        with self._term_mutex:
            self.term = term
        self.leader_id = self.scheduler_id
        self.is_leader_gauge.set(1)
        log.info("scheduler %s leads: it holds %s (ttl %.1fs)", self.scheduler_id,
                 self.lease.key, self.lease.ttl_s)
        term.start()

    def _end_term(self, reason: str, level: int = logging.WARNING) -> None:
        with self._term_mutex:
            term, self.term = self.term, None
        if term is None:
            return
        self.is_leader_gauge.set(0)
        log.log(level, "scheduler %s stops leading: %s", self.scheduler_id, reason)
        term.stop()
        if self._metrics is not None:  # a standby reports no queue
            self._metrics.num_requests_waiting.set(0)
            self._metrics.num_executors.set(0)

    def _resign(self, reason: str, level: int = logging.WARNING) -> None:
        """Ends the term, then deletes the lock if it still holds our id."""
        self._end_term(reason, level)
        try:
            self.lease.release()
        except Exception as exc:  # noqa: BLE001 - then it expires on its own
            log.info("scheduler %s could not release the leader lock: %s", self.scheduler_id, exc)

    def _metrics_for(self, model: str) -> SchedulerMetrics:
        """The model's metrics, made once per process (their series outlive a term)."""
        if self._metrics is None:
            self._metrics = SchedulerMetrics(model, registry=self.obs.registry)
        return self._metrics
