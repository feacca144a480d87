"""Inter-token latency through the output path at many streams: does every step reach the client
as a message of its own, or in bursts? (issue 11)

    python bench/serve_itl.py --streams 256 --step-ms 10 --osl 64 --out bench/results/serve_itl_cpu_X.json

The tiers of the output path, each as it is deployed, on this machine:
- a stepper process that plays scheduler and executor: it reads taxiway:requests, admits every
  request at once into the executor's ExecutorCore around the fake engine (each step waits
  --step-ms with the GIL released, as a step thread waiting for a GPU does) and publishes through
  the executor's OutputPublisher (XADD, one OutputBatch per step);
- a tokenizer tier (a benchmark preset without a tokenizer: token ids only, as the GPU serving
  benchmark runs) in a child process;
- the gateway (GatewayService: grpc.aio, its Redis output reader) in this process, in its loop
  thread, timed there: the loop thread's CPU seconds per token, how many entries each XREAD
  returned, how many deltas each mailbox handed over at once (more than one: a coalesced chunk),
  and the event loop's lag (a 1 ms timer's lateness);
- `taxiway bench serve`'s gRPC client (closed loop at --streams) in --client-processes processes.
Per run: output tokens/s, the client's ITL and TPOT, tokens per streamed message, the stepper's
actual step interval and running requests, the time from the gateway's XADD to the admission,
and each process's CPU time per token (stepper, Redis, tokenizer, the gateway's process, the
clients); the ratio ITL p50 / step interval is the burstiness (1.0: one message per step).
CPU per token is what carries over to another machine (wall-clock figures here depend on what
else the cores run). --profile writes the gateway loop's cProfile to a file.

--floor yield|write: instead of the tiers, a bare grpc.aio server that streams one message per
stream per step (an async generator, or context.write): what grpc.aio alone costs per message.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.redis_server import free_port  # noqa: E402
from taxiway.benchmarks import machine_info, write_result  # noqa: E402

PROMPT_RANGE = (100, 250)
"""Prompt token ids: inside the fake engine's vocabulary and the preset's."""


# -- the stepper process ----------------------------------------------------------------------------

def run_stepper(redis_url: str, step_s: float, max_seqs: int, out_file: str) -> None:
    """Admits every request it reads, steps while any runs; writes its step times at SIGTERM."""
    import signal

    import redis

    from services.common import convert, streams
    from services.executor.core import ExecutorCore
    from services.executor.fake import FakeEngine
    from services.executor.service import OutputPublisher

    client = redis.Redis.from_url(redis_url)
    engine = FakeEngine(num_blocks=1 << 20, block_size=16, max_num_seqs=max_seqs,
                        max_model_len=1 << 16, step_delay_s=step_s)
    publisher = OutputPublisher(client, "stepper")
    core = ExecutorCore(engine, "stepper", publisher)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())

    def intake() -> None:
        reader = redis.Redis.from_url(redis_url)
        last = "0-0"
        while not stop.is_set():
            got = reader.xread({streams.REQUESTS_STREAM: last}, count=4096, block=100)
            for _, entries in got or ():
                for entry_id, fields in entries:
                    last = entry_id
                    item = convert.queue_entry_from_bytes(fields[streams.FIELD])
                    if hasattr(item, "prompt_token_ids"):
                        core.admit(item)
                        waits.append(time.time() - int(entry_id.split(b"-")[0]) / 1e3)

    waits: list[float] = []  # seconds from the gateway's XADD to the admission
    threading.Thread(target=intake, daemon=True).start()
    stamps: list[tuple[float, int]] = []  # (end of step, running requests)
    while not stop.is_set():
        if core.step():
            stamps.append((time.monotonic(), len(engine._running)))
        else:
            time.sleep(0.001)
    publisher.close()
    Path(out_file).write_text(json.dumps({"stamps": stamps, "intake_waits_s": waits}))


# -- the gateway, instrumented ----------------------------------------------------------------------

class GatewayProbe:
    """Counts, on the gateway's loop: entries per XREAD, items per mailbox hand-over, loop lag, and
    the loop thread's CPU time between start() and stop()."""

    def __init__(self, service) -> None:
        self.service = service
        self.reads: Counter = Counter()
        self.handovers: Counter = Counter()
        self.lags_ms: list[float] = []
        self._cpu0 = self._wall0 = 0.0
        self.cpu_s = self.wall_s = 0.0
        self._lag_task = None
        self.profile: cProfile.Profile | None = None
        self._wrap()

    def _wrap(self) -> None:
        from services.gateway import router

        reader_redis = self.service.reader._redis
        xread, reads = reader_redis.xread, self.reads

        async def counted_xread(*a, **kw):
            got = await xread(*a, **kw)
            reads[sum(len(e) for _, e in got or ())] += 1
            return got

        reader_redis.xread = counted_xread
        get_all, handovers = router.Mailbox.get_all, self.handovers

        async def counted_get_all(box, timeout):
            items = await get_all(box, timeout)
            handovers[len(items or ())] += 1
            return items

        router.Mailbox.get_all = counted_get_all

    def reset(self) -> None:
        self.reads.clear()
        self.handovers.clear()
        self.lags_ms.clear()

    async def _lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.001)
            self.lags_ms.append((loop.time() - t - 0.001) * 1e3)

    def start(self, profile: bool) -> None:
        async def go():
            self._cpu0, self._wall0 = time.thread_time(), time.perf_counter()
            self._lag_task = asyncio.create_task(self._lag())
            if profile:
                self.profile = cProfile.Profile()
                self.profile.enable()
        self.service.loop.run(go())

    def stop(self) -> None:
        async def end():
            if self.profile is not None:
                self.profile.disable()
            self._lag_task.cancel()
            self.cpu_s = time.thread_time() - self._cpu0
            self.wall_s = time.perf_counter() - self._wall0
        self.service.loop.run(end())


def log(msg: str) -> None:
    print(f"serve_itl: {msg}", file=sys.stderr, flush=True)


def _cpu_s(pid: int) -> float:
    """utime + stime of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def _spread(counter: Counter) -> dict:
    """{"mean", "p50", "max", "share_gt1"} of a Counter of sizes."""
    n = sum(counter.values())
    if not n:
        return {}
    sizes = sorted(counter.elements())
    return {"count": n, "mean": round(sum(sizes) / n, 3), "p50": sizes[n // 2], "max": sizes[-1],
            "share_gt1": round(sum(c for k, c in counter.items() if k > 1) / n, 3)}


def _step_interval_ms(stamps: list[tuple[float, int]], begin: float, end: float) -> dict:
    """The stepper's step interval inside [begin, end] and how many requests its steps ran."""
    inside = [(s, n) for s, n in stamps if begin <= s <= end]
    gaps = [(b[0] - a[0]) * 1e3 for a, b in zip(inside, inside[1:])]
    running = [n for _, n in inside]
    return {"p50": round(_pct(gaps, 50), 3), "mean": round(sum(gaps) / len(gaps), 3) if gaps else 0.0,
            "steps": len(gaps), "running_mean": round(sum(running) / len(running), 1) if running else 0}


# -- the floor: grpc.aio alone ---------------------------------------------------------------------

class FloorServer:
    """A bare grpc.aio server of taxiway.v1.Gateway/Generate on its own loop thread: every
    step_s a ticker wakes every open stream, which writes one GenerateResponse of one token: what
    any Python gateway on grpc.aio pays per streamed message, with none of taxiway's work."""

    def __init__(self, step_s: float, osl: int, use_write: bool) -> None:
        from services.common.aio import LoopThread

        self.step_s, self.osl, self.use_write = step_s, osl, use_write
        self.loop = LoopThread("floor")
        self.port = self.loop.run(self._start())

    async def _start(self) -> int:
        import grpc

        from services.common.proto import pb, service_full_name

        self._tick = asyncio.get_running_loop().create_future()
        name = service_full_name("Gateway")

        async def generate(request, context):
            for i in range(self.osl):
                await asyncio.shield(self._tick)
                msg = pb.GenerateResponse(request_id="r", token_ids=[100 + i % 50])
                if i == self.osl - 1:
                    msg.finish_reason = pb.FinishReason.Value("FINISH_REASON_LENGTH")
                if self.use_write:
                    await context.write(msg)
                else:
                    yield msg

        async def generate_write(request, context):
            async for _ in generate(request, context):
                pass

        async def model_info(request, context):
            return pb.ModelInfo(name="floor", vocab_size=128256, max_context_length=1 << 16)

        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                generate_write if self.use_write else generate,
                request_deserializer=pb.GenerateRequest.FromString,
                response_serializer=pb.GenerateResponse.SerializeToString),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                model_info, request_deserializer=pb.GetModelInfoRequest.FromString,
                response_serializer=pb.ModelInfo.SerializeToString),
        }
        from services.common.server import AIO_OPTIONS, OPTIONS

        self.server = grpc.aio.server(options=[*OPTIONS, *AIO_OPTIONS])
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(name, handlers)])
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self._ticker = asyncio.create_task(self._ticks())
        return port

    async def _ticks(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.step_s)
            tick, self._tick = self._tick, loop.create_future()
            tick.set_result(None)

    def stop(self) -> None:
        async def end():
            self._ticker.cancel()
            await self.server.stop(0)
        self.loop.run(end())
        self.loop.stop()


def measure_floor(args, step_ms: float) -> dict:
    """The client against FloorServer: messages/s, ITL, and the server loop's CPU per message."""
    from taxiway.serve_bench import ServeBenchConfig, Workload, summarize
    from taxiway.serve_clients import make_client

    server = FloorServer(step_ms / 1e3, args.osl, args.floor == "write")
    try:
        bench = ServeBenchConfig(target="grpc", address=f"127.0.0.1:{server.port}", isl=args.isl,
                                 osl=args.osl, num_requests=args.streams * args.rounds,
                                 concurrency=(args.streams,), warmup_requests=0,
                                 client_processes=args.client_processes, timeout_s=600)
        client = make_client(bench)
        work = Workload([[PROMPT_RANGE[0]] * args.isl] * bench.num_requests, [0.0] * bench.num_requests)
        clients0 = _children_cpu_s()

        async def cpu():
            return time.thread_time()
        cpu0, t0 = server.loop.run(cpu()), time.perf_counter()
        records = client.run(work, bench, args.streams)
        loop_cpu, wall = server.loop.run(cpu()) - cpu0, time.perf_counter() - t0
        clients = _children_cpu_s() - clients0
    finally:
        server.stop()
    run = summarize(records, bench, args.streams)
    ok = [r for r in records if r.error is None]
    messages = sum(len(r.chunk_times) for r in ok)
    return {"floor": args.floor, "step_ms": step_ms, "streams": args.streams,
            "output_tokens_per_s": run.get("output_tokens_per_s"), "errors": run["errors"],
            "itl_ms": run.get("itl_ms"), "tpot_ms": run.get("tpot_ms"),
            "tokens_per_message": round(run.get("output_tokens", 0) / messages, 3) if messages else None,
            "server_loop_cpu_share": round(loop_cpu / wall, 3),
            "server_loop_cpu_us_per_message": round(loop_cpu / messages * 1e6, 2) if messages else None,
            "clients_cpu_us_per_message": round(clients / messages * 1e6, 2) if messages else None}


# -- one run ------------------------------------------------------------------------------------------

def measure(args, step_ms: float) -> dict:
    from services.common.redis_server import EmbeddedRedis
    from services.gateway.config import GatewayConfig
    from services.gateway.service import GatewayService
    from taxiway.serve_bench import ServeBenchConfig, Workload, summarize
    from taxiway.serve_clients import make_client

    redis_server = EmbeddedRedis()
    env = {**os.environ, "TAXIWAY_INSECURE_INTERNAL": "1"}
    tok_port, gw_port = free_port(), free_port()
    stamps_file = Path(f"/tmp/serve_itl_stamps_{os.getpid()}.json")
    procs = [
        subprocess.Popen([sys.executable, "-m", "services.serve", "--role", "tokenizer", "--model",
                          "llama-3.1-8b", "--port", str(tok_port), "--metrics-port", "0"],
                         cwd=ROOT, env=env, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, __file__, "--stepper", redis_server.url, str(step_ms / 1e3),
                          str(args.streams), str(stamps_file)], cwd=ROOT, env=env),
    ]
    service = None
    try:
        cfg = GatewayConfig(port=gw_port, openai_port=-1, redis_url=redis_server.url,
                            tokenizer_address=f"127.0.0.1:{tok_port}", allow_anonymous=True,
                            insecure_internal=True, metrics_port=0, gateway_id="gw")
        service = GatewayService(cfg).start()
        while not service.gate.is_open:
            time.sleep(0.1)
        probe = GatewayProbe(service)
        bench = ServeBenchConfig(target="grpc", address=f"127.0.0.1:{gw_port}", isl=args.isl,
                                 osl=args.osl, num_requests=args.streams * args.rounds,
                                 concurrency=(args.streams,), warmup_requests=0,
                                 client_processes=args.client_processes, timeout_s=600)
        client = make_client(bench)
        rng = random.Random(0)

        def workload(n: int) -> Workload:
            return Workload([[rng.randrange(*PROMPT_RANGE) for _ in range(args.isl)]
                             for _ in range(n)], [0.0] * n)

        log("gateway serving; warm-up")
        client.run(workload(min(args.streams, 32)), bench, min(args.streams, 32))  # warm-up
        log("measuring")
        probe.reset()
        pids = {"stepper": procs[1].pid, "tokenizer": procs[0].pid,
                "redis": redis_server._proc.pid, "gateway_process": os.getpid()}
        cpu0 = {k: _cpu_s(p) for k, p in pids.items()}
        clients0 = _children_cpu_s()
        probe.start(args.profile is not None)
        begin = time.monotonic()
        records = client.run(workload(bench.num_requests), bench, args.streams)
        end = time.monotonic()
        probe.stop()
        cpu = {k: _cpu_s(p) - cpu0[k] for k, p in pids.items()}
        cpu["clients"] = _children_cpu_s() - clients0
        run = summarize(records, bench, args.streams)
    finally:
        if service is not None:
            service.stop()
        procs[1].terminate()
        procs[1].wait(30)
        procs[0].terminate()
        procs[0].wait(10)
        redis_server.stop()
    stepper = json.loads(stamps_file.read_text())
    stamps = stepper["stamps"]
    waits_ms = [w * 1e3 for w in stepper["intake_waits_s"]]
    stamps_file.unlink()
    tokens = run.get("output_tokens", 0)
    ok = [r for r in records if r.error is None and r.chunk_times]
    messages = sum(len(r.chunk_times) for r in ok)
    steady = [(r.chunk_times[i + 1] - r.chunk_times[i]) * 1e3 for r in ok
              for i in range(len(r.chunk_times) - 1)]
    interval = _step_interval_ms(stamps, begin, end)
    result = {
        "step_ms": step_ms, "streams": args.streams,
        "output_tokens_per_s": run.get("output_tokens_per_s"), "errors": run["errors"],
        "itl_ms": run.get("itl_ms"), "tpot_ms": run.get("tpot_ms"), "ttft_ms": run.get("ttft_ms"),
        "step_interval_ms": interval,
        "itl_p50_over_step": round(_pct(steady, 50) / interval["p50"], 2) if interval["p50"] else None,
        "xadd_to_admit_ms": {"p50": round(_pct(waits_ms, 50), 3), "p90": round(_pct(waits_ms, 90), 3)},
        "tokens_per_message": round(tokens / messages, 3) if messages else None,
        "cpu_us_per_token": {k: round(v / tokens * 1e6, 2) for k, v in cpu.items()} if tokens else {},
        "cpu_share": {k: round(v / (end - begin), 3) for k, v in cpu.items()},
        "gateway": {
            "loop_cpu_share": round(probe.cpu_s / probe.wall_s, 3),
            "loop_cpu_us_per_token": round(probe.cpu_s / tokens * 1e6, 2) if tokens else None,
            "entries_per_xread": _spread(probe.reads),
            "items_per_mailbox_handover": _spread(probe.handovers),
            "loop_lag_ms": {"p50": round(_pct(probe.lags_ms, 50), 3),
                            "p90": round(_pct(probe.lags_ms, 90), 3),
                            "p99": round(_pct(probe.lags_ms, 99), 3)},
        },
    }
    if args.profile is not None and probe.profile is not None:
        with open(args.profile, "w") as f:
            pstats.Stats(probe.profile, stream=f).sort_stats("tottime").print_stats(40)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--stepper":
        url, step_s, seqs, out = sys.argv[2:6]
        run_stepper(url, float(step_s), int(seqs), out)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[256], help="concurrent streams (runs)")
    ap.add_argument("--step-ms", type=float, nargs="+", default=[10.0],
                    help="the fake engine's step time (runs, for every --streams value)")
    ap.add_argument("--isl", type=int, default=32)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="requests per stream slot")
    ap.add_argument("--client-processes", type=int, default=1)
    ap.add_argument("--floor", choices=("yield", "write"), default=None,
                    help="instead of the tiers: a bare grpc.aio server, one message per stream per "
                         "step (streamed by an async generator, or by context.write)")
    ap.add_argument("--profile", default=None, help="write the gateway loop's cProfile (text) here")
    ap.add_argument("--label", default="", help="a note stored in the JSON (e.g. before/after)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default: bench/results/serve_itl_cpu_<time>.json)")
    args = ap.parse_args()
    runs = []
    for streams in args.streams:
        for step_ms in args.step_ms:
            one = argparse.Namespace(**{**vars(args), "streams": streams})
            runs.append(measure_floor(one, step_ms) if args.floor else measure(one, step_ms))
            print(json.dumps(runs[-1]), file=sys.stderr)
    result = {"bench": "serve_itl", "label": args.label, "machine": machine_info(),
              "config": {k: v for k, v in vars(args).items() if k not in ("out", "label")},
              "runs": runs}
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    write_result(result, args.out or str(ROOT / "bench" / "results" / f"serve_itl_cpu_{stamp}.json"))


if __name__ == "__main__":
    main()
