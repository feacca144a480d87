"""`taxiway bench serve`: the serving benchmark against a gateway, or the same engine in-process."""

from __future__ import annotations

import argparse
import math
import os

from taxiway.commands.engine_flags import add_engine_arguments, engine_kwargs
from taxiway.serve_bench import TARGETS, ServeBenchConfig

# The in-process engine's defaults: the benchmark model with random weights, as `bench throughput`.
INPROCESS_DEFAULTS = {"model": "llama-3.1-8b", "load_format": "dummy", "enable_prefix_caching": False}


def add_kind(kinds: argparse._SubParsersAction) -> None:
    d = ServeBenchConfig()
    p = kinds.add_parser(
        "serve", help="serving benchmark: Poisson arrivals or fixed concurrency; TTFT/ITL/E2E",
        description="Stream fixed-ISL/OSL requests (random token ids, EOS ignored) or dataset prompts "
                    "to a gRPC gateway, or through the same engine in this process, and report "
                    "output tokens/s, requests/s, goodput and TTFT / ITL / TPOT / E2E percentiles.")
    p.add_argument("--target", choices=TARGETS, default=d.target,
                   help="grpc: a running gateway's Generate; openai: its /v1/completions; "
                        "inprocess: LLMEngine here (default: %(default)s)")
    p.add_argument("--address", default="",
                   help="host:port of the gateway's gRPC port (default 127.0.0.1:50051) or OpenAI "
                        "port (default 127.0.0.1:8000)")
    p.add_argument("--api-key", default=None,
                   help="API key for grpc/openai (default: $TAXIWAY_API_KEY if set)")
    p.add_argument("--tls", action="store_true", help="connect over TLS (grpc/openai)")
    p.add_argument("--ca", default=None, help="PEM CA that verifies the server (with --tls)")
    p.add_argument("--isl", type=int, default=d.isl, help="prompt tokens (default: %(default)s)")
    p.add_argument("--osl", type=int, default=d.osl, help="output tokens (default: %(default)s)")
    p.add_argument("--num-requests", type=int, nargs="+", default=[d.num_requests],
                   help="per run: one count, or one per --concurrency value (default: %(default)s)")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(d.concurrency),
                   help="one run per value: most requests in flight, 0 = no limit (default: 1)")
    p.add_argument("--request-rate", type=float, default=d.request_rate,
                   help="Poisson arrivals per second; inf sends all at once (default: inf)")
    p.add_argument("--dataset", default=None, help="JSONL file of {\"prompt\": text} lines")
    p.add_argument("--warmup-requests", type=int, default=d.warmup_requests, help="default: %(default)s")
    p.add_argument("--slo-ttft-ms", type=float, default=d.slo_ttft_ms, help="goodput SLO (default: %(default)s)")
    p.add_argument("--slo-tpot-ms", type=float, default=d.slo_tpot_ms, help="goodput SLO (default: %(default)s)")
    p.add_argument("--client-processes", type=int, default=d.client_processes,
                   help="client processes per run, for thousands of streams (default: %(default)s)")
    p.add_argument("--connections", type=int, default=d.connections,
                   help="gRPC connections per client process, taking the streams in turn; more than "
                        "one spreads them over gateway replicas (default: %(default)s)")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s, help="per request (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the JSON result here too")
    add_engine_arguments(p, INPROCESS_DEFAULTS,
                         title="in-process engine (--target inprocess; --seed also seeds the prompts)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from taxiway import benchmarks, serve_bench

    if not (args.request_rate > 0 or math.isinf(args.request_rate)):
        raise SystemExit(f"--request-rate must be > 0 or inf, got {args.request_rate}")
    cfg = ServeBenchConfig(
        target=args.target, address=args.address, isl=args.isl, osl=args.osl,
        num_requests=args.num_requests[0] if len(args.num_requests) == 1 else tuple(args.num_requests),
        concurrency=tuple(args.concurrency),
        request_rate=args.request_rate, dataset=args.dataset, warmup_requests=args.warmup_requests,
        slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
        seed=args.engine_seed, timeout_s=args.timeout_s, client_processes=args.client_processes,
        connections=args.connections,
        api_key=args.api_key or os.environ.get("TAXIWAY_API_KEY") or None, tls=args.tls,
        ca_file=args.ca,
        engine=engine_kwargs(args) if args.target == "inprocess" else {})
    benchmarks.write_result(serve_bench.run_benchmark(cfg), args.out)
    return 0
