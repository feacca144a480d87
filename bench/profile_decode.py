"""Where one decode step's GPU time goes at a benchmark's decode shape: every kernel's time in one
step of `--seqs` running sequences with `--ctx` tokens of context each, beside the step's
bandwidth floor (KV bytes read at that context plus the weights as stored, over the copy bandwidth
measured in the same run). The shapes the throughput benchmarks' decode steps run at:

    python bench/profile_decode.py --seqs 331 --ctx 1500 --out t1-1000.json          # T1 1000/1000, BF16
    python bench/profile_decode.py --seqs 249 --ctx 3072 --quantization fp8 --kv-cache-dtype fp8 \\
        --out t2-2048.json                                                            # T2 2048/2048
    python bench/profile_decode.py --seqs 497 --ctx 1500 --quantization fp8 --kv-cache-dtype fp8 \\
        --out t2-1000.json                                                            # T2 1000/1000

Llama-3.1-8B with dummy weights by default; the step is a CUDA-graph replay (or eager with
--enforce-eager). Kernels are grouped by what they do (attention, GEMM, norm, ...) from their
names. Runs on the CPU too (a tiny model, `--model DIR --device cpu`: CPU ops, no floor).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.profile_step import top_kernels  # noqa: E402
from gpu_engine.engine import LLMEngine  # noqa: E402
from gpu_engine.roofline import decode_step_bytes  # noqa: E402
from gpu_engine.sampling_params import SamplingParams  # noqa: E402
from taxiway.benchmarks import copy_bandwidth_gbs, machine_info, random_prompts  # noqa: E402

GROUPS = (  # (group, name fragments), the first match wins
    ("attention", ("decode_split", "decode_combine", "prefill_kernel", "attention", "flash")),
    ("rope_kv_write", ("rope", "rotary", "kv_write")),
    ("norm", ("rms_norm", "rmsnorm", "norm_kernel")),
    ("activation", ("silu", "act_and_mul")),
    ("act_quant", ("quantize_kernel",)),
    ("gemm", ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet", "matmul", "scaled_mm", "fp8_mma", "_mm_kernel",
              "split_k_reduce", "dequant")),
    ("sampling", ("sampl", "argmax", "softmax", "topk", "top_k", "penalt", "gumbel", "logprob", "finalize_kernel",
                  "pivot_kernel", "probs_kernel", "stats_kernel", "gather_kernel")),
    ("copy", ("memcpy", "memset", "copy", "cat", "index")),
)


def group_of(kernel: str) -> str:
    low = kernel.lower()
    for name, parts in GROUPS:
        if any(p in low for p in parts):
            return name
    return "other"


def kernel_times(prof) -> list[dict]:
    """Every device kernel of the profile (bench/profile_step.py's rows), each with its group."""
    return [{**row, "group": group_of(row["kernel"])} for row in top_kernels(prof, n=None)]


def step_floor(engine: LLMEngine, seqs: int, ctx: int, copy_gbs: float | None) -> dict:
    """Bytes a decode step must read (gpu_engine/roofline.py: weights as stored, one embedding row
    per sequence, the KV of every sequence's context, per token what the runner's cache holds) and,
    on a GPU, that over the copy bandwidth."""
    runner = engine.runner
    b = decode_step_bytes(runner.model, seqs, runner.bytes_per_block() // runner.block_size, ctx)
    out = {"kv_gb": round(b.kv / 1e9, 3), "weights_gb": round(b.weights / 1e9, 3),
           "embedding_rows_gb": round(b.embedding_rows / 1e9, 6)}
    if copy_gbs:
        out |= {"copy_gb_per_s": round(copy_gbs, 1), "floor_ms": round(b.total / copy_gbs / 1e6, 3)}
    return out


def decode_args(ap: argparse.ArgumentParser, steps_help: str) -> None:
    """The decode shape's flags (bench/decode_gaps.py takes the same)."""
    ap.add_argument("--model", default="llama-3.1-8b", help="a preset (dummy weights) or a folder")
    ap.add_argument("--seqs", type=int, default=331)
    ap.add_argument("--ctx", type=int, default=1500, help="context tokens of each sequence at the profiled step (at least; "
                    "sequences that decode while later ones prefill have more: reported as context)")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=3, help=steps_help)
    ap.add_argument("--out", default=None)


def decoding_engine(args) -> LLMEngine:
    """An engine whose next step is a plain decode step of --seqs sequences with at least --ctx
    tokens of context each, the loop synchronous (async_scheduling off), room for --steps more."""
    if args.seqs < 1 or args.ctx < 2 or args.steps < 1:
        raise SystemExit("--seqs, --steps must be >= 1 and --ctx >= 2")
    dummy = not Path(args.model).is_dir()
    # Sequences admitted first decode while the later ones prefill (at least 2,048 prompt tokens a
    # step): they must not finish before the profile, and their extra context is reported.
    slack = args.seqs * args.ctx // 2048 + args.steps + 16
    engine = LLMEngine(model=args.model, load_format="dummy" if dummy else "auto", device=args.device,
                       max_model_len=args.ctx + slack, max_num_seqs=args.seqs,
                       enable_prefix_caching=False, quantization=args.quantization,
                       kv_cache_dtype=args.kv_cache_dtype, enforce_eager=args.enforce_eager,
                       admission_policy="guaranteed_no_evict")
    params = SamplingParams(max_tokens=slack, temperature=0.0, ignore_eos=True, detokenize=False)
    # prompts one token short of --ctx: the profiled step reads ctx + 1 tokens of each (or more, see slack)
    for i, p in enumerate(random_prompts(args.seqs, args.ctx - 1, engine.model_config.vocab_size, 3)):
        engine.add_request(str(i), p, params)
    while engine.scheduler.prefill_backlog_tokens() > 0:
        engine.step()
    engine.async_scheduling = False  # one step at a time: each profile holds exactly one step
    engine.step()  # the step in flight (if any) collected; the next is a plain decode step
    running = len(engine.scheduler.running)
    if running != args.seqs:
        raise SystemExit(f"{running} sequences run, not {args.seqs}: the KV pool is too small for "
                         f"{args.seqs} x {args.ctx} tokens")
    return engine


def running_context(engine: LLMEngine) -> dict:
    """Context tokens of the running sequences: mean, min, max."""
    contexts = [len(seq.token_ids) for seq in engine.scheduler.running]
    return {"mean": round(sum(contexts) / len(contexts), 1), "min": min(contexts), "max": max(contexts)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    decode_args(ap, "profiled decode steps (each reported)")
    args = ap.parse_args(argv)
    engine = decoding_engine(args)
    cuda = engine.device.type == "cuda"
    context = running_context(engine)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps = []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            engine.step()
            if cuda:
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t) * 1e3
        kernels = kernel_times(prof)
        groups: dict[str, float] = {}
        for k in kernels:
            groups[k["group"]] = round(groups.get(k["group"], 0.0) + k["total_ms"], 4)
        steps.append({"step_ms": round(ms, 3), "kernel_ms": round(sum(k["total_ms"] for k in kernels), 3),
                      "groups_ms": dict(sorted(groups.items(), key=lambda g: -g[1])), "kernels": kernels})
    engine.abort_request(list(engine.requests))
    copy_gbs = copy_bandwidth_gbs(engine.device) if cuda else None
    result = {"benchmark": "profile_decode", "machine": machine_info(), "command": " ".join(sys.argv),
              "config": {k: v for k, v in vars(args).items() if k != "out"},
              "context": context, "floor": step_floor(engine, args.seqs, round(context["mean"]), copy_gbs),
              "steps": steps}
    best = min(steps, key=lambda s: s["kernel_ms"])
    print(f"{args.seqs} seqs x {args.ctx} ctx: step {best['step_ms']:.2f} ms, kernels {best['kernel_ms']:.2f} ms, "
          f"floor {result['floor'].get('floor_ms', 'n/a')} ms")
    for g, v in best["groups_ms"].items():
        print(f"  {g:14s} {v:9.3f} ms")
    for k in best["kernels"][:12]:
        print(f"  {k['total_ms']:9.3f} ms {k['calls']:5d}x  {k['kernel'][:90]}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
