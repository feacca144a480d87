"""`taxiway bench throughput|latency|sweep`: the trtllm-bench protocol, results as JSON. Every
engine setting is a flag (from EngineConfig, as for `taxiway serve`); the bench's own defaults for
the device stand for the ones not given (taxiway.benchmarks.GPU_ENGINE_DEFAULTS /
CPU_ENGINE_DEFAULTS)."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from taxiway.benchmarks import APIS, CPU_ENGINE_DEFAULTS, GPU_ENGINE_DEFAULTS, BenchConfig
from taxiway.commands.engine_flags import add_engine_arguments, engine_overrides

SWEEP_SIZES = [256, 512, 1024, 2048, 4096]


def _default_help() -> dict[str, str]:
    """Each engine setting the bench sets for itself, as its help says it."""
    out = {"max_model_len": "ISL + OSL"}
    for name in GPU_ENGINE_DEFAULTS.keys() | CPU_ENGINE_DEFAULTS.keys():
        gpu, cpu = GPU_ENGINE_DEFAULTS.get(name, "the engine's"), CPU_ENGINE_DEFAULTS.get(name, "the engine's")
        out[name] = str(gpu) if gpu == cpu else f"{gpu} with a GPU, {cpu} on the CPU"
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="offline throughput / latency benchmarks (JSON results)")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    defaults = BenchConfig()
    for kind, help_text in (("throughput", "all requests at once; output and total tokens/s"),
                            ("latency", "one request; decode tokens/s after the first token"),
                            ("sweep", "throughput at several max_num_seqs, one model load; host and GPU "
                                      "ms per decode step at each")):
        k = kinds.add_parser(kind, help=help_text, description=help_text)
        w = k.add_argument_group("workload")
        for f in dataclasses.fields(BenchConfig):
            if f.name == "engine":
                continue
            value = getattr(defaults, f.name)
            kwargs = {"choices": APIS} if f.name == "api" else {"type": int}
            w.add_argument("--" + f.name.replace("_", "-"), default=value,
                           help=f.metadata["help"] + ("" if value is None else f" (default: {value})"), **kwargs)
        if kind == "sweep":
            w.add_argument("--sizes", type=int, nargs="+", default=SWEEP_SIZES,
                           help="max_num_seqs values (default: %(default)s)")
        w.add_argument("--out", default=None, help="write the JSON result here too")
        add_engine_arguments(k, default_help=_default_help(), only_given=True)
        k.set_defaults(func=run)
    from taxiway.commands import bench_serve

    bench_serve.add_kind(kinds)


def run(args: argparse.Namespace) -> int:
    from taxiway import benchmarks

    cfg = BenchConfig(isl=args.isl, osl=args.osl, api=args.api, engine=engine_overrides(args),
                      num_requests=args.num_requests or (1 if args.kind == "latency" else None))
    if args.kind == "sweep":
        if cfg.api != "engine":
            raise SystemExit("bench sweep runs the engine driver only (--api engine)")
        result = benchmarks.sweep(cfg, args.sizes)
    elif args.kind == "throughput":
        result = benchmarks.throughput(cfg)
    else:
        result = benchmarks.latency(cfg)
    result["command"] = "taxiway " + shlex.join(sys.argv[1:])  # run as `taxiway bench ...` (or -m taxiway.cli)
    benchmarks.write_result(result, args.out)
    return 0
