"""Per-token host cost of each serving tier with an engine that costs nothing: how many output
tokens per second a tier can move on its own, on this machine.

    python bench/serve_tiers.py --streams 256 --osl 64 --out bench/results/serve_tiers_cpu_X.json

Three measurements, each in this process, one tier at a time:
- executor: ExecutorCore around the fake engine (step_delay 0), its output going to Redis through
  the executor's OutputPublisher (an embedded redis-server). Reports the step thread's host time
  per token beyond the engine's own (what each engine step waits for) and the tokens/s that
  reach Redis; once with steps that cost nothing, once with steps that wait --device-step-ms
  with the GIL released (a GPU's step: work of other threads hides there).
- detokenize: one Detokenize exchange with the tokenizer tier (a child process, grpc.aio) against
  the same detokenizer called in place; per exchange.
- gateway_text / gateway_token_ids (a model with a tokenizer / a benchmark preset without one):
  GatewayCore streaming `streams` requests of `osl` tokens each, fed one OutputBatch per
  step in lockstep (decoded from bytes, routed, detokenized through the tokenizer tier, one chunk
  per token), consumed as a client would; tokens/s, and the time one step takes to reach every
  stream (a floor under the inter-token latency at that concurrency).
Each is run --repeat times and the best run kept (the machine may be shared). Before each run the
heap is frozen as a tier process freezes it once started (services/run.py; --no-freeze-heap: not),
and full garbage collections during the run are counted with the longest pause.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_engine.sampling_params import SamplingParams  # noqa: E402
from services.common import convert  # noqa: E402
from services.common.types import Delta, EngineRequest  # noqa: E402
from services.executor.fake import FakeEngine  # noqa: E402
from services.run import freeze_startup_heap  # noqa: E402
from taxiway.benchmarks import machine_info, write_result  # noqa: E402


class GcPauses:
    """Full (generation 2) garbage collections while it is entered: how many, the longest (ms)."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append((time.perf_counter() - self._t0) * 1e3)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def figures(self) -> dict:
        return {"gc_full_collections": len(self.pauses),
                "gc_full_pause_ms_max": round(max(self.pauses, default=0.0), 2)}


FREEZE_HEAP = True
"""Set by --no-freeze-heap: measure as the tiers ran before they froze their start-up heap."""


def _settle() -> None:
    """Before a measured run: what the tier process does once it has started."""
    if FREEZE_HEAP:
        freeze_startup_heap()
    else:
        gc.collect()


def _requests(streams: int, osl: int, gateway_id: str = "gw") -> list[EngineRequest]:
    params = SamplingParams(max_tokens=osl, min_tokens=osl, ignore_eos=True, temperature=0.0)
    return [EngineRequest(f"{gateway_id}-{i:032x}", gateway_id, tuple(range(10, 42)), params)
            for i in range(streams)]


def _engine(streams: int, device_step_s: float = 0.0) -> FakeEngine:
    return FakeEngine(num_blocks=1 << 20, block_size=16, max_num_seqs=streams, max_model_len=1 << 16,
                      step_delay_s=device_step_s)


def bench_executor(streams: int, osl: int, redis_url: str, device_step_s: float) -> dict:
    """The step thread's time per token beyond the engine's, and the tokens/s reaching Redis.
    device_step_s: each engine step also sleeps this long, the GIL released, as a step thread
    waiting for a GPU does (other threads' Python work can hide there)."""
    import redis

    from services.executor.core import ExecutorCore
    from services.executor.service import OutputPublisher

    engine = _engine(streams, device_step_s)
    for r in _requests(streams, osl):
        engine.add_request(r.request_id, list(r.prompt_token_ids), convert.engine_params(r.params))
    t0 = time.perf_counter()
    tokens = 0
    while engine.has_unfinished_requests():
        tokens += sum(len(o.outputs[0].token_ids) for o in engine.step())
    engine_s = time.perf_counter() - t0

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    publisher = OutputPublisher(client, "exec-bench")
    core = ExecutorCore(_engine(streams, device_step_s), "exec-bench", publisher)
    for r in _requests(streams, osl):
        core.admit(r)
    _settle()
    with GcPauses() as pauses:
        t0 = time.perf_counter()
        while core.step():
            pass
        step_s = time.perf_counter() - t0
        publisher.close()
        published_s = time.perf_counter() - t0
    entries = client.xlen("taxiway:out:gw")
    return {
        "tokens": tokens, "steps": entries, "device_step_ms": device_step_s * 1e3,
        "engine_only_tok_s": round(tokens / engine_s),
        "step_thread_tok_s": round(tokens / step_s),
        "step_thread_overhead_us_per_token": round((step_s - engine_s) / tokens * 1e6, 2),
        "published_tok_s": round(tokens / published_s),
        "published_us_per_token": round(published_s / tokens * 1e6, 2),
        **pauses.figures(),
    }


async def _detok_exchanges(client, local_core, n: int) -> dict:
    remote = await client.detokenizer((10, 11), skip_special_tokens=True, stop=(),
                                      include_stop_str_in_output=False)
    local = local_core.detokenizer((10, 11))
    for _ in range(50):  # warm-up
        await remote.add([70])
    t0 = time.perf_counter()
    for _ in range(n):
        await remote.add([70])
    grpc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        local.add([70])
    local_s = time.perf_counter() - t0
    await remote.aclose()
    return {"grpc_us_per_exchange": round(grpc_s / n * 1e6, 2),
            "in_place_us_per_exchange": round(local_s / n * 1e6, 2)}


class _Intake:
    """Intake that only counts: the bench's feeder plays scheduler and executor."""

    def __init__(self) -> None:
        self.submitted: list[EngineRequest] = []
        self.event = asyncio.Event()

    async def submit(self, request: EngineRequest) -> None:
        self.submitted.append(request)
        self.event.set()

    async def abort(self, abort) -> None:
        pass


async def _gateway_stream(core, intake: _Intake, streams: int, osl: int) -> dict:
    """Lockstep: step k+1 is fed once every stream took step k, so that each token leaves as a
    chunk of its own (the inter-token-latency regime: no coalescing hides the per-token cost)."""
    from services.gateway.core import GenerateInput

    taken = [0] * osl
    step_done = asyncio.Event()

    async def consume() -> tuple[int, int]:
        params = SamplingParams(max_tokens=osl, min_tokens=osl, ignore_eos=True, temperature=0.0)
        n_tokens = n_chunks = 0
        async for chunk in core.generate(GenerateInput(params, token_ids=tuple(range(10, 42)))):
            n_chunks += 1
            for _ in chunk.token_ids:
                taken[n_tokens] += 1
                if taken[n_tokens] == streams:
                    step_done.set()
                n_tokens += 1
        return n_tokens, n_chunks

    async def feed() -> None:
        """One OutputBatch per step for every request, as an executor publishes it."""
        while len(intake.submitted) < streams:
            intake.event.clear()
            await intake.event.wait()
        reqs = list(intake.submitted)
        for step in range(osl):
            step_done.clear()
            deltas = [Delta(r.request_id, r.attempt, step, [70 + step % 20],
                            finish_reason="length" if step == osl - 1 else None,
                            num_prompt_tokens=len(r.prompt_token_ids) if step == 0 else 0)
                      for r in reqs]
            core.router.dispatch(convert.output_batch_from_bytes(
                convert.output_batch_to_bytes("exec", deltas)))
            await step_done.wait()

    with GcPauses() as pauses:
        t0 = time.perf_counter()
        results = await asyncio.gather(feed(), *(consume() for _ in range(streams)))
        elapsed = time.perf_counter() - t0
    tokens = sum(t for t, _ in results[1:])
    chunks = sum(c for _, c in results[1:])
    return {"tokens": tokens, "chunks": chunks, "tok_s": round(tokens / elapsed),
            "us_per_token": round(elapsed / tokens * 1e6, 2),
            "step_ms": round(elapsed / osl * 1e3, 2), **pauses.figures()}


TOKENIZERS = {"text": ["--fake-engine"], "token_ids": ["--model", "llama-3.1-8b"]}
"""The tokenizer tiers measured: the fake byte tokenizer (text, as a real model has), and a
benchmark preset without a tokenizer (token ids only, as the GPU serving benchmark runs)."""


def _spawn_tokenizer(kind: str) -> tuple[subprocess.Popen, int]:
    """A tokenizer tier in a process of its own, as it is deployed."""
    from services.common.redis_server import free_port

    port = free_port()
    env = {**os.environ, "TAXIWAY_INSECURE_INTERNAL": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "services.serve", "--role", "tokenizer",
                             *TOKENIZERS[kind], "--port", str(port), "--metrics-port", "0"],
                            cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    return proc, port


async def _ready(client, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.model_info()
            return
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def bench_gateway(kind: str, streams: int, osl: int, exchanges: int, repeat: int) -> dict:
    from services.gateway.clients import GrpcTokenizerClient
    from services.gateway.core import GatewayCore
    from services.tokenizer.config import TokenizerConfig
    from services.tokenizer.core import load_core

    proc, port = _spawn_tokenizer(kind)

    async def run() -> dict:
        client = GrpcTokenizerClient(f"127.0.0.1:{port}")
        await _ready(client)
        out = {}
        if kind == "text":
            local = load_core(TokenizerConfig(fake_engine=True, insecure_internal=True))
            out["detokenize"] = _best([await _detok_exchanges(client, local, exchanges)
                                       for _ in range(repeat)], "grpc_us_per_exchange")
        intake = _Intake()
        core = GatewayCore("gw", client, intake)
        await _gateway_stream(core, intake, 8, 4)  # warm-up
        runs = []
        for _ in range(repeat):
            intake.submitted.clear()
            _settle()
            runs.append(await _gateway_stream(core, intake, streams, osl))
        out[f"gateway_{kind}"] = _best(runs, "us_per_token")
        await client.close()
        return out

    try:
        return asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(10)


def _best(runs: list[dict], key: str) -> dict:
    """The run with the lowest `key` (the least disturbed by the machine's other work), with the
    full garbage collections of all the runs (a pause is the tier's, not the machine's)."""
    best = dict(min(runs, key=lambda r: r[key]))
    if "gc_full_collections" in best:
        best["gc_full_collections"] = sum(r["gc_full_collections"] for r in runs)
        best["gc_full_pause_ms_max"] = max(r["gc_full_pause_ms_max"] for r in runs)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=256, help="concurrent requests")
    ap.add_argument("--osl", type=int, default=64, help="output tokens per request")
    ap.add_argument("--device-step-ms", type=float, default=5.0,
                    help="the executor is also measured with engine steps that wait this long")
    ap.add_argument("--exchanges", type=int, default=2000, help="Detokenize exchanges timed")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the best is kept")
    ap.add_argument("--no-freeze-heap", action="store_true",
                    help="do not gc.freeze() before measuring (as the tiers ran before they did)")
    ap.add_argument("--label", default="", help="a note stored in the JSON (e.g. before/after)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default: bench/results/serve_tiers_cpu_<time>.json)")
    args = ap.parse_args()
    global FREEZE_HEAP
    FREEZE_HEAP = not args.no_freeze_heap
    from services.common.redis_server import EmbeddedRedis

    redis_server = EmbeddedRedis()
    try:
        executor = {f"executor_device_{ms:g}ms": _best(
            [bench_executor(args.streams, args.osl, redis_server.url, ms / 1e3)
             for _ in range(args.repeat)], "step_thread_overhead_us_per_token")
            for ms in (0.0, args.device_step_ms)}
    finally:
        redis_server.stop()
    result = {
        "bench": "serve_tiers", "label": args.label, "machine": machine_info(),
        "config": {"streams": args.streams, "osl": args.osl, "exchanges": args.exchanges,
                   "device_step_ms": args.device_step_ms,
                   "repeat": args.repeat, "freeze_heap": FREEZE_HEAP},
        **executor,
        **{k: v for kind in TOKENIZERS
           for k, v in bench_gateway(kind, args.streams, args.osl, args.exchanges, args.repeat).items()},
    }
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    write_result(result, args.out or str(ROOT / "bench" / "results" / f"serve_tiers_cpu_{stamp}.json"))


if __name__ == "__main__":
    main()
