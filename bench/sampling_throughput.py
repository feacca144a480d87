"""Issue 13's table: throughput of sampled and penalised requests beside greedy, in one process.

Through the public API (`LLM.generate`), Llama-3.1-8B dummy weights (or --model), N x ISL/OSL,
EOS ignored, prefix caching off and fresh random prompts for every row, so no row reuses another's
KV. Rows: all greedy; all temperature 0.8 / top_p 0.95 / top_k 50; the same plus
repetition_penalty 1.1; one penalised request among N - 1 greedy; seeded sampling; greedy with
top-20 logprobs; greedy again (drift check). Then batch-1 decode (ISL 128, OSL 256) greedy vs
sampled with penalties, in decode tokens/s after the first token.

    python bench/sampling_throughput.py --out bench/results/sampling-throughput.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_engine.llm import LLM  # noqa: E402
from gpu_engine.sampling_params import OutputKind, SamplingParams  # noqa: E402
from taxiway.benchmarks import machine_info, random_prompts, write_result  # noqa: E402

SAMPLED = dict(temperature=0.8, top_p=0.95, top_k=50)


def rows(osl: int) -> list[tuple[str, object]]:
    """(name, SamplingParams or a function of the request index giving them)."""
    base = SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True)
    sampled = replace(base, **SAMPLED)
    penalised = replace(sampled, repetition_penalty=1.1)
    one_penalised = replace(base, repetition_penalty=1.1)
    return [
        ("greedy", base),
        ("sampled_t0.8_p0.95_k50", sampled),
        ("sampled_plus_repetition_penalty_1.1", penalised),
        ("one_penalised_among_greedy", lambda i: one_penalised if i == 0 else base),
        ("seeded_sampling", lambda i: replace(sampled, seed=1000 + i)),
        ("greedy_top20_logprobs", replace(base, logprobs=20)),
        ("greedy_again", base),
    ]


def warm_up(llm: LLM, args) -> None:
    """Every row's kind of request once on a full batch that shrinks one request at a time (so
    the kernels have compiled for every batch-size class before anything is timed)."""
    vocab = llm.engine.model_config.vocab_size
    n = min(args.max_num_seqs, args.num_requests)
    prompts = random_prompts(n, args.isl, vocab, seed=1)
    for _, params in rows(16):
        per = [params(i) if callable(params) else params for i in range(n)]
        llm.generate(prompts, [replace(p, max_tokens=1 + i % 16) for i, p in enumerate(per)])


def throughput_rows(llm: LLM, args) -> list[dict]:
    vocab = llm.engine.model_config.vocab_size
    out = []
    for k, (name, params) in enumerate(rows(args.osl)):
        prompts = random_prompts(args.num_requests, args.isl, vocab, seed=100 + k)  # fresh per row
        per = [params(i) for i in range(len(prompts))] if callable(params) else params
        llm.engine.step_times.reset()
        start = time.perf_counter()
        results = llm.generate(prompts, per)
        elapsed = time.perf_counter() - start
        tokens = sum(len(r.outputs[0].token_ids) for r in results)
        if tokens != args.num_requests * args.osl:
            raise RuntimeError(f"{name}: generated {tokens} tokens, expected {args.num_requests * args.osl}")
        out.append({"row": name, "elapsed_s": round(elapsed, 3), "output_tokens_per_s": round(tokens / elapsed, 1),
                    "step_times": llm.engine.step_times.summary()})
        print(f"{name:40s} {tokens / elapsed:10.1f} tok/s", flush=True)
    greedy = out[0]["output_tokens_per_s"]
    for r in out:
        r["vs_greedy"] = round(r["output_tokens_per_s"] / greedy, 3)
    return out


def batch1(llm: LLM, args) -> list[dict]:
    """Decode tokens/s after the first token of one request, greedy vs sampled with penalties."""
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    cases = [("greedy", SamplingParams(temperature=0.0)),
             ("sampled_with_penalties", SamplingParams(**SAMPLED, repetition_penalty=1.1,
                                                       presence_penalty=0.5, frequency_penalty=0.5, seed=7))]
    out = []
    for name, params in cases:
        best = []
        for rep in range(3):
            prompt = random_prompts(1, 128, vocab, seed=500 + rep)[0]
            p = replace(params, max_tokens=256, ignore_eos=True, detokenize=False, output_kind=OutputKind.DELTA)
            engine.add_request(f"{name}-{rep}", prompt, p)
            times = []
            while engine.has_unfinished_requests():
                for o in engine.step():
                    times.extend([time.perf_counter()] * len(o.outputs[0].token_ids))
            best.append((len(times) - 1) / (times[-1] - times[0]))
        out.append({"case": name, "decode_tokens_per_s": round(sorted(best)[1], 1), "runs": [round(b, 1) for b in best]})
        print(f"batch-1 {name:30s} {sorted(best)[1]:8.1f} tok/s", flush=True)
    out[1]["vs_greedy"] = round(out[1]["decode_tokens_per_s"] / out[0]["decode_tokens_per_s"], 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--isl", type=int, default=128)
    p.add_argument("--osl", type=int, default=128)
    p.add_argument("--num-requests", type=int, default=2000)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
              max_num_seqs=args.max_num_seqs, enable_prefix_caching=False,
              max_model_len=max(args.isl + args.osl, 128 + 256))
    warm_up(llm, args)
    result = {"benchmark": "sampling_throughput", "command": " ".join(sys.argv), "machine": machine_info(),
              "config": vars(args), "throughput": throughput_rows(llm, args), "batch1": batch1(llm, args)}
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
