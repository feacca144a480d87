"""`taxiway bench throughput|latency|sweep`: the trtllm-bench protocol, results as JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json

from gpu_engine.config import EngineConfig
from taxiway.benchmarks import BenchConfig

SWEEP_SIZES = [256, 512, 1024, 2048, 4096]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="offline throughput / latency benchmarks (JSON results)")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    defaults = BenchConfig()
    for kind, help_text in (("throughput", "all requests at once; output and total tokens/s"),
                            ("latency", "one request; decode tokens/s after the first token"),
                            ("sweep", "throughput at several max_num_seqs, one model load; host and GPU "
                                      "ms per decode step at each")):
        k = kinds.add_parser(kind, help=help_text)
        for f in dataclasses.fields(BenchConfig):
            flag = "--" + f.name.replace("_", "-")
            value = getattr(defaults, f.name)
            if isinstance(value, bool):
                k.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
            elif f.name == "speculative_config":  # the engine's declaration of it
                help_text = {e.name: e for e in dataclasses.fields(EngineConfig)}[f.name].metadata["help"]
                k.add_argument(flag, type=json.loads, metavar="JSON", default=value, help=help_text)
            elif f.name == "api":
                k.add_argument(flag, choices=("engine", "llm"), default=value,
                               help="llm: through LLM.generate on the engine's defaults")
            else:
                k.add_argument(flag, type=type(value), default=value)
        if kind == "sweep":
            k.add_argument("--sizes", type=int, nargs="+", default=SWEEP_SIZES, help="max_num_seqs values")
        k.add_argument("--out", default=None, help="write the JSON result here too")
        k.set_defaults(func=run)
    from taxiway.commands import bench_serve

    bench_serve.add_kind(kinds)


def run(args: argparse.Namespace) -> int:
    from taxiway import benchmarks

    names = {f.name for f in dataclasses.fields(BenchConfig)}
    cfg = BenchConfig(**{k: v for k, v in vars(args).items() if k in names})
    if args.kind == "latency" and cfg.num_requests == BenchConfig.num_requests:
        cfg = dataclasses.replace(cfg, num_requests=1)
    if args.kind == "sweep":
        if cfg.api != "engine":
            raise SystemExit("bench sweep runs the engine driver only (--api engine)")
        result = benchmarks.sweep(cfg, args.sizes)
    elif args.kind == "throughput":
        result = benchmarks.throughput(cfg)
    else:
        result = benchmarks.latency(cfg)
    benchmarks.write_result(result, args.out)
    return 0
