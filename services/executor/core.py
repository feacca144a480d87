"""The executor's step loop around the engine, without gRPC or Redis.

RPC threads call `admit` / `abort`, which only queue a command; the loop thread applies the
commands between steps in the order they came, runs `engine.step()`, turns its outputs into one
batch of deltas per gateway for `sink`, and publishes the state on `board`. The engine is only
ever touched by the loop thread.

A step that raises never ends the loop: the requests of that step's batch fail (INTERNAL, each
gateway told), `engine.recover()` frees their blocks and checks the pool, and the loop goes on.
When the engine cannot go on (max_step_failures failures in a row, a broken pool, a device
error, a lost tensor-parallel rank, an error outside the engine), `broken` says why and `run()`
returns: the service then leaves the pool and the scheduler moves the remaining requests elsewhere.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opentelemetry import trace

from gpu_engine.errors import DeadlineExceeded, InvalidRequest, TaxiwayError, TensorParallelError
from services.common import errors
from services.common.convert import engine_params
from services.common.metrics import ExecutorMetrics
from services.common.telemetry import PassThroughTracerProvider
from services.common.types import Delta, Ended, EngineRequest, ExecutorState, KvEvent
from services.executor.observe import RequestTrace, StepMetrics
from services.executor.state import StateBoard

log = logging.getLogger(__name__)

Sink = Callable[[str, list[Delta]], None]
"""sink(gateway_id, deltas): hands one step's deltas for one gateway to the output stream."""


@dataclass
class _Tracked:
    gateway_id: str
    attempt: int
    next_index: int
    deadline: float | None
    trace: RequestTrace
    queue_time_s: float = 0.0
    first: bool = True


class ExecutorCore:
    def __init__(self, engine, executor_id: str, sink: Sink, *, clock: Callable[[], float] = time.time,
                 tracer: trace.Tracer | None = None, metrics: ExecutorMetrics | None = None,
                 max_step_failures: int = 3):
        self.engine = engine
        self.executor_id = executor_id
        self.board = StateBoard(executor_id)
        self._sink = sink
        self._clock = clock
        self._tracer = tracer or PassThroughTracerProvider().get_tracer("taxiway.executor")
        self._metrics = StepMetrics(metrics) if metrics is not None else None
        self.draining = False
        """Set by the service on SIGTERM: published, so that the scheduler admits nothing more."""
        self.max_step_failures = max_step_failures
        self.broken: str | None = None
        """Why the engine cannot go on (set once; run() then returns)."""
        self._failures = 0
        """Failed steps in a row."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._commands: list[tuple[EngineRequest, int] | str] = []
        """Admissions (request, admit_seq) and aborts (request id), in arrival order."""
        self._tracked: dict[str, _Tracked] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._last_admit_seq = 0
        self._ended: list[Ended] = []
        """Requests that ended on their own this step (finished, or failed here)."""
        self._republish = False
        self._publish([], [])

    # -- called from RPC threads -----------------------------------------------------------------

    def admit(self, request: EngineRequest, admit_seq: int = 0) -> None:
        with self._lock:
            self._commands.append((request, admit_seq))
        self._wake.set()

    def abort(self, request_ids: Iterable[str]) -> None:
        """Applied in order with admissions: an abort sent before an Admit of the same id (the
        scheduler replacing an attempt) never touches the new attempt."""
        with self._lock:
            self._commands.extend(request_ids)
        self._wake.set()

    def drain(self) -> None:
        """Admit nothing more (the service refuses Admit) and say so in the next state."""
        with self._lock:
            self.draining = self._republish = True
        self._wake.set()

    @property
    def idle(self) -> bool:
        """No request held, none queued for admission."""
        return not self._tracked and not any(isinstance(c, tuple) for c in self._commands)

    # -- the loop thread -----------------------------------------------------------------------------

    def run(self, stop: threading.Event, idle_wait_s: float = 0.05) -> None:
        """Steps until `stop` is set or the engine is broken (`broken` says why)."""
        while not stop.is_set() and self.broken is None:
            try:
                busy = self.step()
            except Exception as exc:  # noqa: BLE001 - outside the engine's step: state unknown
                log.exception("executor %s: the step loop failed", self.executor_id)
                self.broken = f"the step loop failed: {type(exc).__name__}: {exc}"
                return
            if not busy:
                self._wake.wait(idle_wait_s)
                self._wake.clear()

    def step(self) -> bool:
        """Applies queued commands, runs one engine step; False when there was nothing to do."""
        with self._lock:
            commands, self._commands = self._commands, []
            republish, self._republish = self._republish, False
        out: dict[str, list[Delta]] = defaultdict(list)
        finished: list[str] = []
        for command in commands:
            if isinstance(command, str):
                self._drop([command] if command in self._tracked else [], finished)
                continue
            request, seq = command
            self._add(request, out, finished)
            self._last_admit_seq = max(self._last_admit_seq, seq)
        self._expire(out, finished)
        busy = self.engine.has_unfinished_requests()
        if busy:
            for output in self._engine_step(out, finished):
                self._collect(output, out, finished)
        for gateway_id, deltas in out.items():
            self._sink(gateway_id, deltas)
        if busy or commands or finished or republish:
            self._publish(finished, [KvEvent(kind == "stored", h)
                                     for kind, h in self.engine.take_kv_events()])
            self._ended = []
        return busy or bool(commands)

    def _engine_step(self, out: dict[str, list[Delta]], finished: list[str]) -> list:
        t0 = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - one failed step must not end the loop
            self._step_failed(exc, out, finished)
            return []
        self._failures = 0
        if self._metrics is not None:
            self._metrics.step(time.perf_counter() - t0)
        return outputs

    def _step_failed(self, exc: Exception, out: dict[str, list[Delta]], finished: list[str]) -> None:
        """Fails the step's batch (INTERNAL to each gateway), repairs the engine, and decides
        whether it can go on."""
        self._failures += 1
        rec = self.engine.recover()
        log.error("executor %s: engine step failed (%d in a row): %s: %s; its batch, now aborted: "
                  "%s; block pool: %s", self.executor_id, self._failures, type(exc).__name__, exc,
                  "; ".join(rec.batch) or "empty", rec.integrity_error or "sound",
                  exc_info=exc)
        message = (f"executor {self.executor_id}: the engine step failed ({type(exc).__name__}: "
                   f"{exc}); the request was aborted")
        for rid in rec.aborted:
            t = self._tracked.pop(rid, None)
            if t is None:
                continue
            out[t.gateway_id].append(Delta(rid, t.attempt, t.next_index, finish_reason="abort",
                                           error=("TaxiwayError", message)))
            finished.append(rid)
            self._ended.append(Ended(rid, t.attempt))
            t.trace.dropped("failed", message)
        if isinstance(exc, TensorParallelError):  # a rank died: this executor is lost
            self.broken = str(exc)
        elif rec.integrity_error is not None:
            self.broken = f"the KV block pool is inconsistent after a failed step: {rec.integrity_error}"
        elif is_device_error(exc):
            self.broken = f"device error: {type(exc).__name__}: {exc}"
        elif self._failures >= self.max_step_failures:
            self.broken = (f"{self._failures} engine steps failed in a row "
                           f"(max_step_failures={self.max_step_failures}); last: "
                           f"{type(exc).__name__}: {exc}")

    def _add(self, req: EngineRequest, out: dict[str, list[Delta]], finished: list[str]) -> None:
        rid = req.request_id
        held = self._tracked.get(rid)
        if held is not None and held.attempt > req.attempt:  # a late Admit of an older attempt
            log.warning("executor %s: ignoring attempt %d of %s, attempt %d runs", self.executor_id,
                        req.attempt, rid, held.attempt)
            return
        if held is not None:  # a resubmission replaces the older attempt
            self._drop([rid], [], "replaced")
        spans = RequestTrace(self._tracer, req, self.executor_id)
        try:
            if req.params.n != 1:  # its deltas have no sample index: the gateway fans n out
                raise InvalidRequest(f"an executor runs one sample per request, got n={req.params.n}")
            self.engine.add_request(rid, list(req.prompt_token_ids), engine_params(req.params),
                                    priority=req.priority,
                                    prior_output_token_ids=req.prior_output_token_ids)
        except TaxiwayError as exc:
            out[req.gateway_id].append(Delta(rid, req.attempt, error=errors.to_wire(exc)))
            finished.append(rid)
            self._ended.append(Ended(rid, req.attempt))
            spans.dropped("refused", str(exc))
            return
        self._tracked[rid] = _Tracked(req.gateway_id, req.attempt, len(req.prior_output_token_ids),
                                      req.deadline, spans, req.queue_time_s)
        if req.deadline:
            heapq.heappush(self._deadlines, (req.deadline, rid))

    def _drop(self, request_ids: list[str], finished: list[str], reason: str = "aborted",
              error: str | None = None) -> None:
        if request_ids:
            self.engine.abort_request(request_ids)
            for rid in request_ids:
                t = self._tracked.pop(rid, None)
                if t is not None:
                    t.trace.dropped(reason, error)
            finished.extend(request_ids)

    def _expire(self, out: dict[str, list[Delta]], finished: list[str]) -> None:
        now = self._clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, rid = heapq.heappop(self._deadlines)
            t = self._tracked.get(rid)
            if t is None or t.deadline != deadline:
                continue
            err = errors.to_wire(DeadlineExceeded(f"request {rid} passed its deadline"))
            out[t.gateway_id].append(Delta(rid, t.attempt, t.next_index, finish_reason="abort",
                                           error=err))
            self._drop([rid], finished, "deadline", err[1])
            self._ended.append(Ended(rid, t.attempt))

    def _collect(self, output, out: dict[str, list[Delta]], finished: list[str]) -> None:
        t = self._tracked.get(output.request_id)
        if t is None:
            return
        c = output.outputs[0]
        if not c.token_ids and not output.finished:
            return
        d = Delta(output.request_id, t.attempt, t.next_index, list(c.token_ids),
                  finish_reason=c.finish_reason if output.finished else None,
                  stop_token_id=c.stop_reason if isinstance(c.stop_reason, int) else None,
                  logprobs=c.logprobs)
        if t.first:
            d.num_prompt_tokens = len(output.prompt_token_ids)
            d.num_cached_tokens = output.num_cached_tokens
            d.queue_time_s = t.queue_time_s
            d.prompt_logprobs = output.prompt_logprobs  # None unless the request asked
            t.first = False
            t.trace.first_token(output.num_cached_tokens)
        t.next_index += len(c.token_ids)
        out[t.gateway_id].append(d)
        if output.finished:
            del self._tracked[output.request_id]
            finished.append(output.request_id)
            self._ended.append(Ended(output.request_id, t.attempt))
            t.trace.finished(c.finish_reason or "stop", t.next_index)

    def _publish(self, finished: list[str], kv_events: list[KvEvent]) -> None:
        s = self.engine.stats()
        if self._metrics is not None:
            self._metrics.sample(s)
        state = ExecutorState(
            self.executor_id, num_total_blocks=s.num_total_blocks,
            num_free_blocks=s.num_free_blocks, block_size=s.block_size, num_running=s.num_running,
            num_waiting=s.num_waiting, prefill_backlog_tokens=s.prefill_backlog_tokens,
            max_num_seqs=max_num_seqs(self.engine), last_admit_seq=self._last_admit_seq,
            max_model_len=engine_max_model_len(self.engine), draining=self.draining)
        self.board.publish(state, finished, kv_events, frozenset(self._tracked), self._ended)


def is_device_error(exc: BaseException) -> bool:
    """A CUDA / accelerator error: the device (and so the engine) is unusable."""
    text = f"{type(exc).__name__}: {exc}"
    return type(exc).__name__ == "AcceleratorError" or any(
        marker in text for marker in ("CUDA error", "device-side assert", "illegal memory access",
                                      "CUBLAS_STATUS", "cudaError"))


def engine_report(engine) -> dict:
    """What the executor tells the pool about its engine: every setting it was started with, and
    the facts measured at start-up (KV blocks, device, dtype)."""
    config = getattr(engine, "config", None)
    report = {"settings": config.settings_dict() if hasattr(config, "settings_dict") else {}}
    stats = engine.stats()
    report.update(num_kv_blocks=stats.num_total_blocks, block_size=stats.block_size,
                  device=str(getattr(engine, "device", "")), dtype=str(getattr(engine, "dtype", "")))
    return report


def engine_max_model_len(engine) -> int:
    return int(getattr(engine, "max_model_len", 0) or engine.model_config.max_position_embeddings)


def max_num_seqs(engine) -> int:
    for holder in (engine, getattr(engine, "config", None)):
        value = getattr(holder, "max_num_seqs", None)
        if isinstance(value, int):
            return value
    return 256
