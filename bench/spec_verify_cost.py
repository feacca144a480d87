"""Cost of a speculative verify step against a plain decode step (issue 10): for each batch size B
and k drafted tokens per sequence, ms per step and verify / decode, with the speedup projected
from those costs and measured acceptance lengths (a projection, not a measurement).

    python bench/spec_verify_cost.py --out $OUT/spec-verify-cost.json          # Llama-3.1-8B, dummy
    python bench/spec_verify_cost.py --acceptance $OUT/spec-batch1.json --out ...  # + projection

One engine, built with speculative decoding on (n-gram: no drafter changes its memory or graphs).
Per measurement its SpecDecoder is swapped, the engine's own code does the rest:
  decode       engine.spec = None: the engine as built without speculative_config (on a GPU:
               overlapped steps, CUDA-graph replay)
  decode_sync  a proposer that drafts nothing: a speculating engine's step when nothing is
               drafted (synchronous, still graph replay)
  verify k     a proposer that drafts k tokens for every sequence at every step (ForcedDrafts):
               the scheduler plans B verify entries of 1 + k tokens, the runner runs them eagerly
               through the chunked-prefill attention path and the rejection sampler, the scheduler
               rolls back the rejected KV: the path real drafts take.
B fresh requests of --context random tokens each (the same prompts every time: prefix-cache hits
make the prefills cheap) are prefilled, --warmup steps run, then --reps runs of --steps steps are
timed between device synchronisations; ms = the median run's time / --steps. Every timed step is
checked to be of the expected kind with B sequences and B * (1 + k) tokens.

Not included: drafting. The forced drafts cost nothing, so a draft model's or EAGLE-3 head's
forward adds to verify_ms; n-gram lookup is host work of a few microseconds per sequence. How many
of the drafts (the last token repeated) random weights accept is recorded (observed_acceptance_length):
acceptance changes only the KV rollback and how fast the context grows (context_start ..
context_end), not the verify forward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_engine.engine import LLMEngine  # noqa: E402
from gpu_engine.sampling_params import SamplingParams  # noqa: E402
from gpu_engine.spec.decoding import SpecDecoder  # noqa: E402
from gpu_engine.spec.proposer import DraftBatch, Proposal  # noqa: E402
from taxiway.benchmarks import machine_info, random_prompts, write_result  # noqa: E402

PROJECTION_NOTE = (
    "projection, not a measurement: projected_speedup = acceptance_length (tokens per verify step) / "
    "verify_over_decode (this run's verify step of k drafts over its plain decode step, same batch). "
    "It assumes every step drafts k tokens, drafting costs nothing (a draft model's or EAGLE-3 head's "
    "forward is not in verify_ms) and the acceptance measured (batch 1, its own model) holds at this "
    "model and batch size.")


class ForcedDrafts:
    """A proposer that drafts `k` tokens (the last token repeated) for every sequence it is asked
    for, as many as the engine allows (it caps k before max_tokens); k = 0 drafts nothing."""

    method = "forced"

    def __init__(self, k: int):
        self.k = k

    def propose(self, batch: DraftBatch) -> Proposal:
        return Proposal([[r.token_ids[-1]] * min(self.k, r.num_drafts) for r in batch.requests])

    def release(self, seq_id: int) -> None:
        """Nothing kept per sequence."""


def output_budget(args) -> int:
    """max_tokens of every request: room for each step to emit k + 1 tokens, so that no sequence
    ends, or gets fewer drafts, while it is measured."""
    return (args.warmup + args.steps * args.reps + 2) * (max(args.ks) + 1)


def build_engine(args) -> LLMEngine:
    return LLMEngine(
        model=args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
        max_num_seqs=max(args.batch_sizes), max_model_len=args.context + output_budget(args),
        num_kv_blocks=args.num_kv_blocks, async_scheduling=args.async_scheduling,
        speculative_config={"method": "ngram", "num_speculative_tokens": max(args.ks),
                            "disable_above_batch_size": max(args.batch_sizes), "disable_when_slower": False})


def set_mode(engine: LLMEngine, k: int | None) -> None:
    """k None: no speculation; 0: speculating, nothing drafted; k > 0: k drafts every step (no
    gate: a measured verify step must not be turned off for being slower)."""
    base = replace(engine.config.speculative, disable_when_slower=False)
    engine.spec = None if k is None else SpecDecoder(replace(base, num_speculative_tokens=max(k, 1)),
                                                     ForcedDrafts(k))


def start_batch(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> None:
    """Add the requests and step until every prompt is computed."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    for i, p in enumerate(prompts):
        engine.add_request(f"v{i}", p, params)
    sched = engine.scheduler
    for _ in range(1000):
        if not sched.waiting and all(s.num_computed_tokens >= s.num_prompt_tokens for s in sched.running):
            return
        engine.step()
    raise RuntimeError(f"{len(prompts)} prompts were not prefilled in 1000 steps")


def end_batch(engine: LLMEngine) -> None:
    engine.abort_request(list(engine.requests))
    while engine.has_unfinished_requests():  # an overlapped step still in flight
        engine.step()


def timed_runs(engine: LLMEngine, steps: int, reps: int) -> list[float]:
    """Seconds per step of each run of `steps` consecutive steps, the device synchronised around it."""
    cuda = engine.device.type == "cuda"
    out = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(engine.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize(engine.device)
        out.append((time.perf_counter() - t0) / steps)
    return out


def check_steps(engine: LLMEngine, kind: str, batch: int, tokens: int, steps: int) -> dict:
    """The timed steps' summary, after checking each was a `kind` step of `batch` sequences and
    `tokens` tokens."""
    summary = engine.step_times.summary()
    row = summary.get(kind, {})
    if set(summary) != {kind} or row["steps"] != steps or row["mean_seqs"] != batch or row["mean_tokens"] != tokens:
        got = {k: {f: v.get(f) for f in ("steps", "mean_seqs", "mean_tokens")} for k, v in summary.items()}
        raise RuntimeError(f"expected {steps} {kind} steps of {batch} sequences and {tokens} tokens, "
                           f"the engine ran {got}")
    return row


def measure(engine: LLMEngine, args, prompts: list[list[int]], k: int | None) -> dict:
    """One (batch, mode) measurement; see the module docstring."""
    batch = len(prompts)
    set_mode(engine, k)
    start_batch(engine, prompts, output_budget(args))
    for _ in range(args.warmup):
        engine.step()
    context_start = statistics.mean(s.num_tokens for s in engine.scheduler.running)
    engine.step_times.reset()
    before = engine.scheduler.spec_stats.snapshot()
    runs = timed_runs(engine, args.steps, args.reps)
    context_end = statistics.mean(s.num_tokens for s in engine.scheduler.running)
    drafted = k or 0
    times = check_steps(engine, "verify" if drafted else "decode", batch, batch * (1 + drafted),
                        args.steps * args.reps)
    row = {"batch": batch, "ms": round(statistics.median(runs) * 1e3, 3),
           "runs_ms": [round(r * 1e3, 3) for r in runs], "gpu_ms": times.get("gpu_ms"),
           "host_ms": times["host_ms"], "context_start": round(context_start, 1),
           "context_end": round(context_end, 1)}
    if drafted:
        stats = engine.scheduler.spec_stats.since(before)
        row.update(k=drafted, observed_acceptance_length=round(stats.mean_acceptance_length, 3))
    end_batch(engine)
    return row


def measure_all(engine: LLMEngine, args) -> tuple[dict[int, dict], dict[int, dict], list[dict]]:
    """(decode rows by batch, decode_sync rows by batch, verify rows with their ratios)."""
    prompts = random_prompts(max(args.batch_sizes), args.context, engine.model_config.vocab_size, args.seed)
    decode, sync, verify = {}, {}, []
    for b in args.batch_sizes:
        decode[b] = measure(engine, args, prompts[:b], None)
        sync[b] = measure(engine, args, prompts[:b], 0)
        for k in args.ks:
            row = measure(engine, args, prompts[:b], k)
            row["verify_over_decode"] = round(row["ms"] / decode[b]["ms"], 3)
            row["verify_over_decode_sync"] = round(row["ms"] / sync[b]["ms"], 3)
            verify.append(row)
            print(f"B={b:3d} k={k}: verify {row['ms']:8.3f} ms, decode {decode[b]['ms']:8.3f} ms "
                  f"(sync {sync[b]['ms']:8.3f}): x{row['verify_over_decode']}", file=sys.stderr)
    return decode, sync, verify


# -- projection -------------------------------------------------------------------------------------
def acceptance_from_file(path: str) -> list[dict]:
    """Acceptance lengths of a bench/spec_decode.py result: per method, over all prompts and per
    prompt kind (the mean of the prompts' mean acceptance lengths). A prompt that verified no draft
    has none and is left out; a gated method whose "-always" run is there is left out too (the gate
    speculated only where it paid, and the projection is for speculating every step)."""
    data = json.loads(Path(path).read_text())
    try:
        k, per_prompt = data["config"]["k"], data["per_prompt"]
    except (KeyError, TypeError) as exc:
        raise SystemExit(f"--acceptance {path}: no config.k / per_prompt ({exc}); expected a "
                         f"bench/spec_decode.py result (spec-batch1.json)") from None
    model = data["config"].get("model") or "the default model"
    out = []
    for method, rows in per_prompt.items():
        if f"{method}-always" in per_prompt:
            continue
        rows = [r for r in rows if "spec_decode" in r and r["spec_decode"].get("num_drafts", 1) > 0]
        for kind in ["all", *dict.fromkeys(r["kind"] for r in rows)]:
            picked = [r["spec_decode"]["mean_acceptance_length"] for r in rows if kind in ("all", r["kind"])]
            if picked:
                out.append({"method": method, "kind": kind, "k": k,
                            "acceptance_length": round(statistics.mean(picked), 3),
                            "source": f"{path} (batch 1, {model})"})
    return out


def acceptance_given(items: list[str]) -> list[dict]:
    """--acceptance-length K=L items."""
    out = []
    for item in items:
        try:
            k, length = item.split("=")
            out.append({"method": "given", "kind": "all", "k": int(k), "acceptance_length": float(length),
                        "source": "--acceptance-length"})
        except ValueError:
            raise SystemExit(f"--acceptance-length takes K=L items (k drafted tokens, mean tokens per "
                             f"verify step), e.g. 4=2.5; got {item!r}") from None
    return out


def check_sources(sources: list[dict], ks: list[int]) -> None:
    """Each acceptance length is for a k this run measures, and within [1, k + 1]."""
    for src in sources:
        k, length = src["k"], src["acceptance_length"]
        if k not in ks:
            raise SystemExit(f"the acceptance length of {src['method']} ({src['source']}) is for k={k}, "
                             f"but this run measures k in {sorted(ks)}: add {k} to --ks")
        if not 1.0 <= length <= k + 1:
            raise SystemExit(f"acceptance length {length} of {src['method']} is outside [1, k + 1 = {k + 1}]")


def project(verify: list[dict], sources: list[dict]) -> list[dict]:
    """Projected speedup per acceptance source and batch size, at the source's k."""
    return [{**src, "batch": row["batch"], "verify_over_decode": row["verify_over_decode"],
             "projected_speedup": round(src["acceptance_length"] / row["verify_over_decode"], 3)}
            for src in sources for row in verify if row["k"] == src["k"]]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b", help="preset name or checkpoint folder")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--ks", type=int, nargs="+", default=list(range(1, 9)), help="drafted tokens per step")
    ap.add_argument("--context", type=int, default=512, help="prompt tokens per sequence")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed run")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per measurement (the median is reported)")
    ap.add_argument("--num-kv-blocks", type=int, default=None, help="default: what the memory holds")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="overlapped steps where nothing is drafted (default: the engine's, on with a GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--acceptance", default=None, help="a bench/spec_decode.py result: project from its "
                                                       "acceptance lengths")
    ap.add_argument("--acceptance-length", nargs="*", default=[], metavar="K=L",
                    help="mean tokens per verify step L at k drafts, e.g. 4=2.5")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for name in ("batch_sizes", "ks"):
        if min(getattr(args, name)) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("context", "steps", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be positive, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sources = acceptance_given(args.acceptance_length)
    if args.acceptance:
        sources += acceptance_from_file(args.acceptance)
    check_sources(sources, args.ks)
    t0 = time.perf_counter()
    engine = build_engine(args)
    startup = time.perf_counter() - t0
    decode, sync, verify = measure_all(engine, args)
    write_result({
        "benchmark": "spec_verify_cost", "config": vars(args), "machine": machine_info(),
        "engine": {"model": engine.model_config.name, "dtype": str(engine.dtype).removeprefix("torch."),
                   "device": str(engine.device), "cuda_graphs": engine.runner.graphs is not None,
                   "async_scheduling": engine.async_scheduling, "num_kv_blocks": engine.num_kv_blocks,
                   "startup_s": round(startup, 2), "graph_capture_s": round(engine.graph_capture_s, 2)},
        "decode": list(decode.values()), "decode_sync": list(sync.values()), "verify": verify,
        "projection": {"note": PROJECTION_NOTE, "rows": project(verify, sources)},
    }, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
