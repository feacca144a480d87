"""The clients of `taxiway bench serve`: the gateway's gRPC or OpenAI port (asyncio, optionally
several processes) and the same engine in this process. Each runs a Workload and returns one RequestRecord per
request, timed with time.monotonic() (one clock for every process of this machine)."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections import deque

from taxiway.serve_bench import RequestRecord, ServeBenchConfig, Workload

START_MARGIN_S = 0.2
"""Client processes start together this long after the last of them is ready."""
READY_TIMEOUT_S = 120.0


def make_client(cfg: ServeBenchConfig):
    if cfg.target in ("grpc", "openai"):
        return StreamingClient(cfg)
    if cfg.target == "inprocess":
        return InProcessClient(cfg)
    raise ValueError(f"unknown target {cfg.target!r}")


class StreamingClient:
    """Streams the workload to a gateway: gRPC Generate calls over one aio channel per client
    process, or OpenAI /v1/completions SSE streams (taxiway/openai_stream.py); optionally from
    several processes."""

    def __init__(self, cfg: ServeBenchConfig):
        if cfg.target == "grpc":
            from taxiway.grpc_stream import model_info
        else:
            from taxiway.openai_stream import model_info
        self.info = model_info(cfg)
        """{"name", "vocab_size", "max_context_length"}"""
        self.kind = cfg.target

    def vocab_size(self) -> int:
        return self.info["vocab_size"]

    def run(self, workload: Workload, cfg: ServeBenchConfig, concurrency: int) -> list[RequestRecord]:
        per = split_concurrency(concurrency, cfg.client_processes, len(workload.prompts))
        procs = len(per)
        if procs == 1:
            return _run_sync(cfg, workload, concurrency, time.monotonic())
        parts = [(cfg, Workload(workload.prompts[p::procs], workload.send_at[p::procs]), per[p])
                 for p in range(procs)]
        ctx = multiprocessing.get_context("spawn")
        ready, start = ctx.Barrier(procs + 1, timeout=READY_TIMEOUT_S), ctx.Value("d", 0.0)
        with ctx.Pool(procs, initializer=_share_start, initargs=(ready, start)) as pool:
            pending = pool.starmap_async(_run_part, parts, chunksize=1)
            # every process has imported its client (a slow spawn would otherwise start late and
            # stretch the run), then they all start at one time
            try:
                ready.wait()
                start.value = time.monotonic() + START_MARGIN_S
                ready.wait()
            except threading.BrokenBarrierError:  # a process failed before it was ready: its error
                pending.wait(READY_TIMEOUT_S)  # (the broken barrier ends the others at once)
                if pending.ready() and not pending.successful():
                    pending.get()
                raise
            results = pending.get()
        records: list[RequestRecord] = [None] * len(workload.prompts)  # type: ignore[list-item]
        for p, part in enumerate(results):
            records[p::procs] = part
        return records

    def describe(self) -> dict:
        return {"target": {"kind": self.kind, "model": self.info["name"],
                           "max_context_length": self.info["max_context_length"]}}

    def close(self) -> None:
        pass


def split_concurrency(concurrency: int, processes: int, requests: int) -> list[int]:
    """Each client process's in-flight limit: never more processes than requests or than the
    run's concurrency, and the limits add up to it exactly (0: no limit, in every process)."""
    procs = max(1, min(processes, requests, concurrency or processes))
    return [concurrency // procs + (p < concurrency % procs) for p in range(procs)]


_start_shared = None  # (barrier, start time) in a client process


def _share_start(ready, start) -> None:
    global _start_shared
    _start_shared = (ready, start)


def _run_part(cfg, workload, concurrency) -> list[RequestRecord]:
    """One client process's share: ready (its client imported), then wait for the common start."""
    ready, start = _start_shared
    _client_run(cfg)
    ready.wait()
    ready.wait()  # the parent has set the start time
    return _run_sync(cfg, workload, concurrency, start.value)


def _client_run(cfg):
    if cfg.target == "grpc":
        import grpc  # noqa: F401  (imported here, before the start, not by the first request)

        from services.common.proto import Stub  # noqa: F401
        from taxiway.grpc_stream import run
    else:
        from taxiway.openai_stream import run
    return run


def _run_sync(cfg, workload, concurrency, start) -> list[RequestRecord]:
    return asyncio.run(_client_run(cfg)(cfg, workload, concurrency, start))


class InProcessClient:
    """The same workload through LLMEngine.step() in this process: the services' baseline."""

    def __init__(self, cfg: ServeBenchConfig):
        from gpu_engine.config import EngineConfig
        from gpu_engine.engine import LLMEngine

        self.engine = LLMEngine(EngineConfig(**cfg.engine))

    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    def run(self, workload: Workload, cfg: ServeBenchConfig, concurrency: int) -> list[RequestRecord]:
        from gpu_engine.sampling_params import OutputKind, SamplingParams

        engine = self.engine
        params = SamplingParams(max_tokens=cfg.osl, min_tokens=cfg.osl, ignore_eos=True, temperature=0.0,
                                detokenize=False, output_kind=OutputKind.DELTA)
        pending = deque(range(len(workload.prompts)))
        records: dict[int, RequestRecord] = {}
        in_flight = 0
        start = time.monotonic()
        while pending or engine.has_unfinished_requests():
            now = time.monotonic()
            while (pending and (not concurrency or in_flight < concurrency)
                   and start + workload.send_at[pending[0]] <= now):
                i = pending.popleft()
                engine.add_request(f"s{i}", workload.prompts[i], params)
                records[i] = RequestRecord(start=now)
                in_flight += 1
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, start + workload.send_at[pending[0]] - time.monotonic()))
                continue
            outputs = engine.step()
            now = time.monotonic()
            for out in outputs:
                record = records[int(out.request_id[1:])]
                tokens = out.outputs[0].token_ids
                if tokens:
                    record.chunk_times.append(now)
                    record.num_tokens += len(tokens)
                if out.finished:
                    in_flight -= 1
        return [records[i] for i in range(len(workload.prompts))]

    def describe(self) -> dict:
        e = self.engine
        return {"target": {"kind": "inprocess", "model": e.model_config.name,
                           "engine": e.config.settings_dict(), "num_kv_blocks": e.num_kv_blocks,
                           "device": str(e.device), "dtype": str(e.dtype)},
                "step_times": e.step_times.summary(), "kernel_compiles": e.compile_watch.summary()}

    def close(self) -> None:
        pass
