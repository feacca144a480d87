"""The executor tier's shell: taxiway.v1.Executor over ExecutorCore, the step-loop thread, the
output publisher (Redis XADD, off the step loop) and the registration heartbeat."""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator

from opentelemetry import trace

from gpu_engine.errors import NotReady
from services.common import convert, streams
from services.common.drain import Gate, GatedServicer, wait_until
from services.common.metrics import ExecutorMetrics
from services.common.observe import TierObservability, model_label
from services.common.proto import pb
from services.common.server import GrpcServer, ServerSecurity
from services.common.types import Delta
from services.executor.config import ExecutorConfig
from services.executor.core import ExecutorCore, engine_max_model_len, engine_report
from services.executor.faults import StepFaults, parse_steps

log = logging.getLogger(__name__)


class ExecutorServicer:
    def __init__(self, core: ExecutorCore, heartbeat_s: float, stopping: threading.Event):
        self.core = core
        self._heartbeat_s = heartbeat_s
        self._stopping = stopping

    def Admit(self, request, context):
        if self._stopping.is_set():
            raise NotReady("executor is shutting down")
        self.core.admit(convert.engine_request_from_pb(request.request), request.admit_seq)
        return pb.AdmitResponse()

    def Abort(self, request, context):
        self.core.abort(list(request.request_ids))
        return pb.AbortResponse()

    def WatchState(self, request, context) -> Iterator:
        """Ends when the executor stops or breaks (after the last state): the scheduler then
        counts it lost and moves its requests elsewhere."""
        seen = None
        while context.is_active() and not self._stopping.is_set():
            if self.core.broken is not None:
                if seen != self.core.board.version:
                    yield convert.state_to_pb(self.core.board.read(seen, 0)[0])
                return
            state, seen = self.core.board.read(seen, self._heartbeat_s)
            yield convert.state_to_pb(state)


class OutputPublisher:
    """XADDs each step's deltas to the gateways' streams from its own thread, so that the step
    loop never waits on Redis nor spends its time encoding: the step thread only queues the
    deltas; this thread encodes them (one OutputBatch per gateway per step) and sends whatever
    queued up in one pipeline. On a GPU the encoding then runs while the step thread waits for
    the device."""

    def __init__(self, redis, source: str, on_failure=None):
        self._redis = redis
        self._source = source
        self._on_failure = on_failure or (lambda reason: None)
        """Called with a reason when a batch cannot be encoded: its requests would wait for
        tokens that never come, so the executor must leave the pool (they resume elsewhere)."""
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="output-publisher", daemon=True)
        self._thread.start()

    def __call__(self, gateway_id: str, deltas: list[Delta]) -> None:
        self._queue.put((gateway_id, deltas))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            done = None in items
            pipe = self._redis.pipeline(transaction=False)
            for gateway_id, deltas in (i for i in items if i is not None):
                try:
                    data = convert.output_batch_to_bytes(self._source, deltas)
                except Exception as exc:  # noqa: BLE001 - never a silent stop of this thread
                    log.exception("could not encode an output batch of %d deltas", len(deltas))
                    self._on_failure(f"the output publisher failed: {type(exc).__name__}: {exc}")
                    continue
                key = streams.out_stream(gateway_id)
                pipe.xadd(key, {streams.FIELD: data}, maxlen=streams.OUT_STREAM_MAXLEN,
                          approximate=True)
                pipe.expire(key, streams.OUT_STREAM_TTL_S)
            try:
                pipe.execute()
            except Exception:  # noqa: BLE001 - keep publishing; the gateways' deadlines cover the loss
                log.exception("could not publish %d output batches", len(items))
            if done:
                return


def make_engine(config: ExecutorConfig):
    if config.fake_engine:
        from services.executor.fake import FakeEngine

        return FakeEngine(num_blocks=config.fake_num_blocks, step_delay_s=config.fake_step_s)
    from gpu_engine.engine import LLMEngine

    return LLMEngine(config.engine)


def with_faults(engine, config: ExecutorConfig):
    """The engine, wrapped by the fault injection the config asks for (none by default)."""
    steps = parse_steps(config.fault_step_errors)
    if not steps:
        return engine
    log.warning("fault injection: engine steps %s will raise", sorted(steps))
    return StepFaults(engine, steps)


class ExecutorService:
    """The whole executor: start() loads the engine and joins the pool; drain() admits nothing
    more (NOT_SERVING, Admit UNAVAILABLE, "draining" in its state) and lets the running requests
    finish, still registered and still publishing; stop() leaves the pool."""

    def __init__(self, config: ExecutorConfig, engine=None, *,
                 tracer_provider: trace.TracerProvider | None = None):
        self.config = config
        self.executor_id = config.resolved_id()
        self._engine = engine
        self._provider = tracer_provider
        self.gate = Gate("executor")
        self._stopping = threading.Event()
        self._broken = threading.Event()
        self._registering = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.server: GrpcServer | None = None
        self.core: ExecutorCore | None = None

    def start(self) -> ExecutorService:
        if not self.config.redis_url:
            raise ValueError("the executor needs --redis-url (or REDIS_URL)")
        self.obs = TierObservability("executor", host=self.config.host,
                                     metrics_port=self.config.metrics_port,
                                     tracer_provider=self._provider)
        security = ServerSecurity.internal(self.config)
        self.redis = streams.connect(self.config.redis_url, **self.config.redis_options())
        self._gated = GatedServicer(self.gate, always=("Abort", "WatchState"))
        self.server = GrpcServer(self.config.host, self.config.port, {"Executor": self._gated},
                                 max_workers=self.config.max_workers, security=security).start()
        engine = self._start_loop()
        self._registration = {
            "executor_id": self.executor_id,
            "address": self.config.dial_address(self.server.port),
            "model": engine.model_config.name,
            "max_model_len": engine_max_model_len(engine),
            "engine": engine_report(engine),
        }
        streams.register_executor(self.redis, self.executor_id, self._registration,
                                  self.config.registration_ttl_s)
        self._spawn(self._heartbeat, name="registration")
        self.gate.open()
        self.server.set_serving(True)
        log.info("executor %s serving %s on %s", self.executor_id, engine.model_config.name,
                 self._registration["address"])
        return self

    def _start_loop(self):
        """Builds the engine in the step-loop thread and steps it there. Measured on the CPU
        (torch 2.13, 2 cores): steps ran 2.5x slower in a thread other than the one that had
        built and warmed the engine (per-thread OpenMP pools, most likely)."""
        built = threading.Event()
        box: dict = {}

        def loop() -> None:
            try:
                engine = with_faults(self._engine or make_engine(self.config), self.config)
                self.publisher = OutputPublisher(self.redis, self.executor_id, self._publisher_failed)
                metrics = ExecutorMetrics(model_label(engine.model_config.name),
                                          registry=self.obs.registry)
                self.core = ExecutorCore(engine, self.executor_id, self.publisher,
                                         tracer=self.obs.tracer, metrics=metrics,
                                         max_step_failures=self.config.max_step_failures)
            except BaseException as exc:  # noqa: BLE001 - re-raised in start()
                box["error"] = exc
                built.set()
                return
            box["engine"] = engine
            built.set()
            self.core.run(self._stopping)
            if self.core.broken is not None:
                self._leave_pool(self.core.broken)
            steps = getattr(engine, "step_times", None)
            if steps is not None:  # what `taxiway bench` reports in-process, for the same comparison
                log.info("executor %s step times: %s", self.executor_id, json.dumps(steps.summary()))

        self._spawn(loop, name="step-loop")
        built.wait()
        if "error" in box:
            raise box["error"]
        self._gated.target = ExecutorServicer(self.core, self.config.heartbeat_interval_s,
                                              self._stopping)
        return box["engine"]

    def _publisher_failed(self, reason: str) -> None:
        """The step loop sees `broken` at its next turn, stops and the executor leaves the pool."""
        if self.core.broken is None:
            self.core.broken = reason

    def _leave_pool(self, reason: str) -> None:
        """The engine cannot go on: NOT_SERVING (so a liveness probe restarts the process), no
        Admit, no registration; the state streams end, so the scheduler counts this executor lost
        at once and the gateways resume its requests elsewhere."""
        log.error("executor %s leaves the pool: %s", self.executor_id, reason)
        self.gate.close(f"broken ({reason})")
        self.server.set_serving(False)
        with self._registering:  # no heartbeat registers it again after this
            self._broken.set()
        try:
            streams.unregister_executor(self.redis, self.executor_id)
        except Exception:  # noqa: BLE001 - its TTL ends the registration anyway
            log.exception("could not unregister")

    def _spawn(self, target, *args, name: str) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _heartbeat(self) -> None:
        while not self._stopping.wait(self.config.heartbeat_interval_s):
            try:
                with self._registering:
                    if self._broken.is_set():
                        return
                    streams.register_executor(self.redis, self.executor_id, self._registration,
                                              self.config.registration_ttl_s)
            except Exception as exc:  # noqa: BLE001 - Redis may come back; the TTL decides
                log.warning("registration refresh failed: %s", exc)

    def drain(self, timeout_s: float, interrupted: threading.Event | None = None) -> bool:
        """True when every request it held finished within timeout_s."""
        self.gate.close("draining")  # first: nobody gets in once health says NOT_SERVING
        self.server.set_serving(False)
        self.core.drain()
        return wait_until(lambda: self.core.idle or self._broken.is_set(), timeout_s, interrupted)

    def stop(self) -> None:
        self.gate.close("stopped")
        self._stopping.set()
        try:
            streams.unregister_executor(self.redis, self.executor_id)
        except Exception:  # noqa: BLE001
            log.exception("could not unregister")
        if self.server:
            self.server.stop(1.0)
        for t in self._threads:
            t.join(5)
        self.publisher.close()
        self.obs.close()
