"""The executor's step loop around the engine, without gRPC or Redis.

RPC threads call `admit` / `abort`, which only queue a command; the loop thread applies the
commands between steps, runs `engine.step()`, turns its outputs into one batch of deltas per
gateway for `sink`, and publishes the state on `board`. The engine is only ever touched by the
loop thread.
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

from gpu_engine.errors import DeadlineExceeded, TaxiwayError
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
                 tracer: trace.Tracer | None = None, metrics: ExecutorMetrics | None = None):
        self.engine = engine
        self.executor_id = executor_id
        self.board = StateBoard(executor_id)
        self._sink = sink
        self._clock = clock
        self._tracer = tracer or PassThroughTracerProvider().get_tracer("taxiway.executor")
        self._metrics = StepMetrics(metrics) if metrics is not None else None
        self.draining = False
        """Set by the service on SIGTERM: published, so that the scheduler admits nothing more."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._admits: list[tuple[EngineRequest, int]] = []
        self._aborts: list[str] = []
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
            self._admits.append((request, admit_seq))
        self._wake.set()

    def abort(self, request_ids: Iterable[str]) -> None:
        with self._lock:
            self._aborts.extend(request_ids)
        self._wake.set()

    def drain(self) -> None:
        """Admit nothing more (the service refuses Admit) and say so in the next state."""
        with self._lock:
            self.draining = self._republish = True
        self._wake.set()

    @property
    def idle(self) -> bool:
        """No request held, none queued for admission."""
        return not self._tracked and not self._admits

    # -- the loop thread -----------------------------------------------------------------------------

    def run(self, stop: threading.Event, idle_wait_s: float = 0.05) -> None:
        while not stop.is_set():
            if not self.step():
                self._wake.wait(idle_wait_s)
                self._wake.clear()

    def step(self) -> bool:
        """Applies queued commands, runs one engine step; False when there was nothing to do."""
        with self._lock:
            admits, self._admits = self._admits, []
            aborts, self._aborts = self._aborts, []
            republish, self._republish = self._republish, False
        out: dict[str, list[Delta]] = defaultdict(list)
        finished: list[str] = []
        for request, seq in admits:
            self._add(request, out, finished)
            self._last_admit_seq = max(self._last_admit_seq, seq)
        self._drop([r for r in aborts if r in self._tracked], finished)
        self._expire(out, finished)
        busy = self.engine.has_unfinished_requests()
        if busy:
            t0 = time.perf_counter()
            outputs = self.engine.step()
            if self._metrics is not None:
                self._metrics.step(time.perf_counter() - t0)
            for output in outputs:
                self._collect(output, out, finished)
        for gateway_id, deltas in out.items():
            self._sink(gateway_id, deltas)
        if busy or admits or aborts or finished or republish:
            self._publish(finished, [KvEvent(kind == "stored", h)
                                     for kind, h in self.engine.take_kv_events()])
            self._ended = []
        return busy or bool(admits or aborts)

    def _add(self, req: EngineRequest, out: dict[str, list[Delta]], finished: list[str]) -> None:
        rid = req.request_id
        if rid in self._tracked:  # a resubmission replaces the older attempt
            self._drop([rid], [], "replaced")
        spans = RequestTrace(self._tracer, req, self.executor_id)
        try:
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
