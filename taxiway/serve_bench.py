"""`taxiway bench serve`: the serving benchmark (as vLLM's benchmark_serving and genai-perf run it).

Requests with fixed ISL/OSL (random token ids, EOS ignored, so each produces exactly OSL tokens) or
prompts from a JSONL dataset arrive as a Poisson process at a given rate, or all at once under a
fixed concurrency, and stream their tokens back. Per request: TTFT (send to first token), ITL (gaps
between streamed chunks), TPOT ((E2E - TTFT) / (tokens - 1)) and E2E; per run: output tokens/s,
requests/s and goodput (requests/s within the SLO). Targets: the gRPC gateway, or the same engine
in this process (the baseline the services are compared with).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np

TARGETS = ("grpc", "openai", "inprocess")
DEFAULT_ADDRESS = {"grpc": "127.0.0.1:50051", "openai": "127.0.0.1:8000"}


@dataclass(frozen=True)
class ServeBenchConfig:
    target: str = "grpc"
    """grpc: a gateway's Generate; openai: its /v1/completions (streamed); inprocess: the same
    workload through LLMEngine in this process."""
    address: str = ""
    """host:port of the gateway's gRPC port (target grpc) or OpenAI port (target openai);
    empty: 127.0.0.1:50051 or 127.0.0.1:8000."""
    api_key: str | None = None
    """Sent as `authorization: Bearer <key>` (grpc and openai)."""
    tls: bool = False
    """Connect over TLS (grpc and openai)."""
    ca_file: str | None = None
    """PEM CA bundle that verifies the server's certificate (with tls; default: the system's)."""
    isl: int = 128
    osl: int = 128
    num_requests: int | tuple[int, ...] = 256
    """Requests per run: one count for every run, or one per concurrency value."""
    concurrency: tuple[int, ...] = (1,)
    """Runs, one per value: at most this many requests in flight (0 = no limit)."""
    request_rate: float = math.inf
    """Poisson arrivals (requests/s) of every run; inf sends them all at once."""
    dataset: str | None = None
    """A JSONL file of {"prompt": text} lines, used in order (cycled) instead of random token ids."""
    warmup_requests: int = 8
    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 100.0
    seed: int = 0
    timeout_s: float = 600.0
    client_processes: int = 1
    """Client processes sharing each run (a Python client tops out near 20k streamed messages/s)."""
    connections: int = 1
    """gRPC connections per client process, taking the streams in turn (the OpenAI client opens
    one per request): more than one spreads a process's streams over gateway replicas."""
    engine: dict = field(default_factory=dict)
    """EngineConfig settings of the in-process engine (target inprocess)."""

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if not self.address and self.target in DEFAULT_ADDRESS:
            object.__setattr__(self, "address", DEFAULT_ADDRESS[self.target])
        if self.ca_file and not self.tls:
            raise ValueError("ca_file needs tls (--tls --ca FILE)")
        counts = self.num_requests if isinstance(self.num_requests, tuple) else (self.num_requests,)
        if self.isl < 1 or self.osl < 1 or min(counts) < 1:
            raise ValueError("isl, osl and num_requests must be positive")
        if len(counts) not in (1, len(self.concurrency)):
            raise ValueError(f"num_requests gives {len(counts)} counts for {len(self.concurrency)} "
                             f"concurrency values: give one count, or one per value")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf: all at once), got {self.request_rate}")
        if any(c < 0 for c in self.concurrency) or not self.concurrency:
            raise ValueError(f"concurrency values must be >= 0, got {self.concurrency}")
        if self.client_processes < 1:
            raise ValueError(f"client_processes must be >= 1, got {self.client_processes}")
        if self.connections < 1:
            raise ValueError(f"connections must be >= 1, got {self.connections}")
        if self.connections != 1 and self.target != "grpc":
            raise ValueError(f"connections is for target grpc (openai opens one per request), "
                             f"got {self.connections} with target {self.target!r}")

    def requests_of_run(self, i: int) -> int:
        """How many requests run i (concurrency[i]) sends."""
        if isinstance(self.num_requests, tuple):
            return self.num_requests[i] if len(self.num_requests) > 1 else self.num_requests[0]
        return self.num_requests


@dataclass
class RequestRecord:
    start: float
    chunk_times: list[float] = field(default_factory=list)
    num_tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Workload:
    """The prompts (token ids or texts) and their send times relative to the run's start."""

    prompts: list
    send_at: list[float]


def make_workload(cfg: ServeBenchConfig, vocab_size: int, seed: int, run: int = 0) -> Workload:
    """Run `run`'s prompts and send times."""
    rng = random.Random(seed)
    count = cfg.requests_of_run(run)
    if cfg.dataset:
        with open(cfg.dataset, encoding="utf-8") as f:
            texts = [json.loads(line)["prompt"] for line in f if line.strip()]
        if not texts:
            raise ValueError(f"{cfg.dataset} holds no prompts")
        prompts = [texts[i % len(texts)] for i in range(count)]
    else:
        prompts = [[rng.randrange(100, vocab_size - 100) for _ in range(cfg.isl)]
                   for _ in range(count)]
    t, send_at = 0.0, []
    for _ in prompts:
        send_at.append(t)
        if math.isfinite(cfg.request_rate):
            t += rng.expovariate(cfg.request_rate)
    return Workload(prompts, send_at)


async def send_all(cfg: ServeBenchConfig, workload: Workload, concurrency: int, start: float,
                   send, errors: tuple[type[BaseException], ...], describe) -> list[RequestRecord]:
    """Each prompt of the workload sent at its time, at most `concurrency` in flight (0: no
    limit): `await send(prompt, record)` streams one request into its record; an exception of a
    type in `errors` becomes the record's error (`describe(exc)`), and so does a token count
    other than OSL."""
    limit = asyncio.Semaphore(concurrency) if concurrency else None

    async def one(prompt, send_at: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + send_at - time.monotonic()))
        if limit is not None:
            await limit.acquire()
        record = RequestRecord(start=time.monotonic())
        try:
            await send(prompt, record)
            if record.num_tokens != cfg.osl:
                record.error = f"got {record.num_tokens} tokens, expected {cfg.osl}"
        except errors as exc:
            record.error = describe(exc)
        finally:
            if limit is not None:
                limit.release()
        return record

    return list(await asyncio.gather(*(one(p, t) for p, t in zip(workload.prompts, workload.send_at))))


def summarize(records: list[RequestRecord], cfg: ServeBenchConfig, concurrency: int) -> dict:
    """One run's figures (times in ms); percentiles over the requests that succeeded."""
    ok = [r for r in records if r.error is None and r.chunk_times]
    errors = [r.error for r in records if r.error is not None]
    run = {"concurrency": concurrency, "request_rate": _finite(cfg.request_rate),
           "requests": len(records), "completed": len(ok), "errors": len(errors),
           "first_errors": sorted(set(errors))[:5]}
    if not ok:
        return run
    begin = min(r.start for r in ok)
    end = max(r.chunk_times[-1] for r in ok)
    ttft = [(r.chunk_times[0] - r.start) * 1e3 for r in ok]
    e2e = [(r.chunk_times[-1] - r.start) * 1e3 for r in ok]
    tpot = [(r.chunk_times[-1] - r.chunk_times[0]) * 1e3 / (r.num_tokens - 1) for r in ok if r.num_tokens > 1]
    itl = [(b - a) * 1e3 for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    good = sum(1 for r, t, p in zip(ok, ttft, _tpots(ok)) if t <= cfg.slo_ttft_ms and p <= cfg.slo_tpot_ms)
    tokens = sum(r.num_tokens for r in ok)
    run.update({
        "duration_s": round(end - begin, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / (end - begin), 1),
        "requests_per_s": round(len(ok) / (end - begin), 3),
        "goodput_requests_per_s": round(good / (end - begin), 3),
        "ttft_ms": _percentiles(ttft), "itl_ms": _percentiles(itl), "tpot_ms": _percentiles(tpot),
        "e2e_ms": _percentiles(e2e),
    })
    if concurrency:
        # how long the first `concurrency` requests took to all be sent: ~0 when the clients start
        # together; a large value means a slow client stretched the run
        first = sorted(r.start for r in records)[:concurrency]
        run["ramp_ms"] = round((first[-1] - first[0]) * 1e3, 3)
    return run


def _tpots(ok: list[RequestRecord]) -> list[float]:
    return [(r.chunk_times[-1] - r.chunk_times[0]) * 1e3 / max(r.num_tokens - 1, 1) for r in ok]


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(a.mean()), 3), **{f"p{q}": round(float(np.percentile(a, q)), 3)
                                                  for q in (50, 90, 99)}}


def _finite(x: float) -> float | str:
    """JSON has no Infinity or NaN: such values are written as strings."""
    return x if math.isfinite(x) else str(x)


def run_benchmark(cfg: ServeBenchConfig) -> dict:
    """Every run of the config (one per concurrency value), after a warm-up; the result to write."""
    from taxiway.benchmarks import machine_info
    from taxiway.serve_clients import make_client

    client = make_client(cfg)
    try:
        vocab = client.vocab_size()
        if cfg.warmup_requests:
            warm = ServeBenchConfig(**{**asdict(cfg), "num_requests": cfg.warmup_requests,
                                       "concurrency": (cfg.warmup_requests,), "osl": min(cfg.osl, 16),
                                       "request_rate": math.inf})
            client.run(make_workload(warm, vocab, cfg.seed + 999), warm, cfg.warmup_requests)
        runs = []
        for i, concurrency in enumerate(cfg.concurrency):
            workload = make_workload(cfg, vocab, cfg.seed + i, i)
            t0 = time.perf_counter()
            records = client.run(workload, cfg, concurrency)
            run = summarize(records, cfg, concurrency)
            run["wall_s"] = round(time.perf_counter() - t0, 3)
            runs.append(run)
        extra = client.describe()
    finally:
        client.close()
    config = {k: _finite(v) if isinstance(v, float) else v for k, v in asdict(cfg).items()}
    if config.get("api_key"):
        config["api_key"] = "(given)"  # never a secret in a result file
    return {"benchmark": "serve", "config": config, "machine": machine_info(), **extra, "runs": runs}
