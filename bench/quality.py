"""Quantization quality (BENCHMARKS.md figure Q): perplexity on a fixed text and greedy agreement
with the unquantized model, for any set of variants, through the public API (`LLM`).

    python bench/quality.py --out bench/results/quality-cpu.json            # default model, CPU
    python bench/quality.py --device cuda --dtype bfloat16 --out ...         # the lead, on the GPU
    python bench/quality.py --variant base: --variant llmc:model=/tmp/smol-fp8-dynamic ...

A variant is NAME:KEY=VALUE,... of EngineConfig fields on top of --model/--device/--dtype (model=
a pre-quantized folder; quantization=fp8|awq; kv_cache_dtype=fp8). The first is the baseline.
Text: bench/data/quality_eval.txt (written for this project, never used for calibration or
tuning: `taxiway quantize` calibrates on CPython's pydoc topics). Perplexity over non-overlapping
windows of --window tokens (the first token of each is not scored). Agreement: greedy outputs of
PROMPTS, --max-tokens each; a variant agrees with the baseline on the common prefix of each output.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from taxiway import LLM, SamplingParams  # noqa: E402
from taxiway.benchmarks import machine_info, write_result  # noqa: E402

TEXT = Path(__file__).resolve().parent / "data" / "quality_eval.txt"
DEFAULT_VARIANTS = ["base:", "fp8:quantization=fp8", "fp8-kv8:quantization=fp8,kv_cache_dtype=fp8"]
PROMPTS = [
    "The capital of France is", "Write a short poem about the sea.", "def quicksort(xs):",
    "Once upon a time, in a small village by the mountains,", "Explain photosynthesis in one paragraph.",
    "List five prime numbers:", "The three laws of thermodynamics are", "A recipe for pancakes:",
    "In 1492, Columbus", "The difference between a virus and a bacterium is",
    "Translate to French: The weather is nice today.", "Q: What is 17 times 23?\nA:",
    "The most important invention of the twentieth century was", "import numpy as np\n\n# compute the mean",
    "Dear hiring manager,", "The moon orbits the earth because",
]


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kwargs[key] = _value(value)
    return name, kwargs


def _value(text: str):
    if text in ("", "none", "None"):
        return None
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        return text


def perplexity(llm: LLM, ids: list[int], window: int) -> dict:
    windows = [ids[i : i + window] for i in range(0, len(ids) - 1, window)]
    windows = [w for w in windows if len(w) > 1]
    outs = llm.generate(windows, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                                detokenize=False))
    lps = [lp[t] for o in outs for lp, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]
    return {"perplexity": round(math.exp(-sum(lps) / len(lps)), 4), "scored_tokens": len(lps),
            "windows": len(windows)}


def greedy(llm: LLM, max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


def agreement(got: list[list[int]], want: list[list[int]]) -> dict:
    prefix = []
    for g, w in zip(got, want):
        n = 0
        while n < min(len(g), len(w)) and g[n] == w[n]:
            n += 1
        prefix.append(n)
    total = sum(len(w) for w in want)
    return {"agreeing_prefix_tokens": sum(prefix), "total_tokens": total,
            "share": round(sum(prefix) / total, 4), "identical_outputs": sum(p == len(w) for p, w in zip(prefix, want)),
            "prompts": len(want), "per_prompt_prefix": prefix}


def run_variant(name: str, kwargs: dict, args, ids_text: str) -> tuple[dict, list[list[int]]]:
    base = {"model": args.model, "device": args.device, "dtype": args.dtype, "max_model_len": args.max_model_len}
    base.update(kwargs)
    t0 = time.perf_counter()
    llm = LLM(base.pop("model"), **base)
    ids = llm.get_tokenizer().encode(ids_text)
    result = {"name": name, "engine_args": {**kwargs}, "quantization":
              llm.engine.quant_spec.describe() if llm.engine.quant_spec else "unquantized",
              "kv_cache_dtype": str(llm.engine.runner.kv_dtype).removeprefix("torch.")}
    result.update(perplexity(llm, ids, args.window))
    outs = greedy(llm, args.max_tokens)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{name}: ppl {result['perplexity']} ({result['quantization']})", file=sys.stderr)
    return result, outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: the default model, SmolLM2-135M)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--variant", action="append", default=None, help="NAME:KEY=VALUE,... (repeatable)")
    ap.add_argument("--text", default=str(TEXT))
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    text = Path(args.text).read_text()
    results, baseline = [], None
    for name, kwargs in variants:
        res, outs = run_variant(name, kwargs, args, text)
        if baseline is None:
            baseline, base_ppl = outs, res["perplexity"]
        res["perplexity_vs_baseline"] = round(res["perplexity"] / base_ppl - 1, 5)
        res["greedy_agreement"] = agreement(outs, baseline)
        results.append(res)
    write_result({
        "benchmark": "quality", "command": " ".join(sys.argv), "machine": machine_info(),
        "text": {"file": os.path.relpath(args.text, Path(__file__).resolve().parent.parent),
                 "characters": len(text)},
        "config": {"model": args.model or "default (SmolLM2-135M-Instruct)", "device": args.device,
                   "dtype": args.dtype, "window": args.window, "max_tokens": args.max_tokens},
        "variants": results,
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
