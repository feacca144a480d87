"""Batch-1 speculative decoding: decode tokens/s of one model with no speculation, n-gram, a draft
model and an EAGLE-3 head, prompt by prompt, with the acceptance figures (issue 10's table).

Prompts: the last --per-kind prompts of each kind (chat questions, summarisation-style prompts that
repeat their input, code) of gpu_engine/spec/data/prompts.jsonl or --prompts, through the model's
chat template; greedy, --osl tokens each (EOS ignored), one request at a time. Each method gets its
own engine (one load), one warm-up request, then every prompt; speedup = its decode tokens/s over no
speculation's on the same prompt (no speculation runs first and again last, "none-last": the faster
of its two runs is the baseline, as the first engine of a process measured up to 10% slower in call
M2). Each method runs as configured by default (the gate turns
speculation off where it measures slower: gpu_engine/spec/gate.py) and, as "<method>-always", with
`disable_when_slower: false` (speculation's own speed); --gate picks one of the two.

    python bench/spec_decode.py --draft-model DIR --eagle-head DIR --out bench/results/spec-batch1.json
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from gpu_engine.engine import LLMEngine
from gpu_engine.spec.train_data import encode_prompts, load_prompts
from taxiway.benchmarks import machine_info, run_requests, write_result


def methods(args) -> list[tuple[str, dict | None]]:
    specs = [("ngram", {"method": "ngram", "num_speculative_tokens": args.k})]
    if args.draft_model:
        specs.append(("draft_model", {"method": "draft_model", "num_speculative_tokens": args.k,
                                      "model": args.draft_model}))
    if args.eagle_head:
        specs.append(("eagle3", {"method": "eagle3", "num_speculative_tokens": args.k, "model": args.eagle_head}))
    out: list[tuple[str, dict | None]] = [("none", None)]
    for name, spec in specs:
        if args.gate in ("both", "on"):
            out.append((name, spec))
        if args.gate in ("both", "off"):
            out.append((f"{name}-always", {**spec, "disable_when_slower": False}))
    return [*out, ("none-last", None)]


def pick_prompts(args) -> list[dict]:
    rows = load_prompts(args.prompts)
    kinds = dict.fromkeys(r["kind"] for r in rows)
    return [r for kind in kinds for r in [x for x in rows if x["kind"] == kind][-args.per_kind:]]


def run_method(args, spec: dict | None, prompts: list[dict]) -> tuple[list[dict], dict | None]:
    engine = LLMEngine(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                       num_kv_blocks=args.num_kv_blocks, speculative_config=spec)
    ids = encode_prompts(engine.tokenizer, prompts)
    run_requests(engine, ids[:1], min(args.osl, 16), stream=True)  # warm-up
    engine.step_times.reset()
    out = []
    for p, prompt in zip(prompts, ids):
        before = engine.scheduler.spec_stats.snapshot()
        r = run_requests(engine, [prompt], args.osl, stream=True)
        times = r["token_times"]
        row = {"kind": p["kind"], "prompt_tokens": len(prompt), "ttft_ms": round((times[0] - r["start"]) * 1e3, 2),
               "decode_tokens_per_s": round((len(times) - 1) / (times[-1] - times[0]), 1), "steps": r["steps"]}
        if spec is not None:
            row["spec_decode"] = engine.scheduler.spec_stats.since(before).summary()
        out.append(row)
    gate = engine.spec.gate.summary() if engine.spec is not None and engine.spec.gate is not None else None
    steps = engine.step_times.summary()
    engine.shutdown()
    del engine
    free_memory()
    return out, {"gate": gate, "step_times": steps}


def acceptance(rows: list[dict]) -> dict:
    """Over all prompts of one method: tokens per verify entry (None where nothing was verified:
    no speculation, or a gate that kept it off) and how many drafts were verified."""
    stats = [r["spec_decode"] for r in rows if "spec_decode" in r]
    drafts = sum(s["num_drafts"] for s in stats)
    accepted = sum(s["num_accepted_tokens"] for s in stats)
    return {"mean_acceptance_length": round(1 + accepted / drafts, 3) if drafts else None,
            "num_drafts": drafts if stats else None}


def free_memory() -> None:
    """Give the last engine's GPU memory back before the next method's engine profiles what is free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="target folder (default: the default model)")
    ap.add_argument("--draft-model", default=None, help="draft checkpoint folder (method draft_model)")
    ap.add_argument("--eagle-head", default=None, help="EAGLE-3 head folder (method eagle3)")
    ap.add_argument("--prompts", default=None, help="JSON-lines prompts (default: the shipped set)")
    ap.add_argument("--per-kind", type=int, default=4)
    ap.add_argument("--osl", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--num-kv-blocks", type=int, default=None,
                    help="a fixed KV cache per engine (default: sized from free memory, as the engine does)")
    ap.add_argument("--gate", choices=("both", "on", "off"), default="both",
                    help="on: each method as configured by default (speculation turns itself off where it "
                         "measures slower); off: always speculate; both: each method both ways")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    prompts = pick_prompts(args)
    runs = {name: run_method(args, spec, prompts) for name, spec in methods(args)}
    results = {name: rows for name, (rows, _) in runs.items()}
    base = [max(a["decode_tokens_per_s"], b["decode_tokens_per_s"])  # the faster of the two per prompt
            for a, b in zip(results["none"], results["none-last"])]
    for rows in results.values():
        for row, ref in zip(rows, base):
            row["speedup"] = round(row["decode_tokens_per_s"] / ref, 3)
    summary = {name: {"mean_speedup": round(sum(r["speedup"] for r in rows) / len(rows), 3),
                      "min_speedup": min(r["speedup"] for r in rows), **acceptance(rows)}
               for name, rows in results.items()}
    gates = {name: info["gate"] for name, (_, info) in runs.items() if info["gate"] is not None}
    steps = {name: info["step_times"] for name, (_, info) in runs.items()}
    write_result({"benchmark": "spec_decode_batch1", "config": vars(args), "machine": machine_info(),
                  "summary": summary, "gate": gates, "step_times": steps, "per_prompt": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
