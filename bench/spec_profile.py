"""Where a speculative step's host time goes, batch 1: each method (no speculation, n-gram, a draft
model, an EAGLE-3 head; always speculating, and EAGLE-3 as configured by default) decodes one
prompt under torch.profiler. Per method: steps, wall ms per output token, the CUDA runtime calls per
step (kernel launches, graph replays, copies, synchronizations), the same counted inside the
proposer's propose() alone, the operators and CUDA runtime calls taking the most host time, and
spans around the step loop's and the proposers' main functions (host time inside each, waits for
the device included).

    python bench/spec_profile.py --draft-model DIR --eagle-head DIR --out spec-profile.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from bench.spec_decode import free_memory
from gpu_engine.engine import LLMEngine
from gpu_engine.spec.decoding import SpecDecoder
from gpu_engine.spec.train_data import encode_prompts, load_prompts
from taxiway.benchmarks import machine_info, random_prompts, run_requests, write_result

RUNTIME = {"launch": ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"),
           "graph": ("cudaGraphLaunch",), "copy": ("cudaMemcpyAsync", "cudaMemcpy", "cudaMemsetAsync"),
           "sync": ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize",
                    "cudaStreamWaitEvent", "cudaEventQuery")}
PROPOSE = "spec.propose"


MARKED = {  # module: (class or None, function names): each call becomes a span of its own
    "gpu_engine.runner": ("ModelRunner", ("launch", "collect", "compute_logits", "_sample")),
    "gpu_engine.spec.verify": (None, ("launch_verify", "collect_verify")),
    "gpu_engine.sampler": ("Sampler", ("advance", "verify_params", "verify_probs")),
    "gpu_engine.spec.eagle3_proposer": ("Eagle3Proposer", ("_plan", "_prefill", "_chain", "_draw")),
    "gpu_engine.spec.draft_model": ("DraftModelProposer", ("_plan", "_chain", "_logits")),
    "gpu_engine.spec.draft_cache": ("DraftKVCache", ("sync", "commit", "metadata", "reserve")),
    "gpu_engine.spec.proposer": (None, ("draw_drafts",)),
    "gpu_engine.scheduler": ("Scheduler", ("schedule", "update", "commit")),
}


def _span(name: str, fn):
    def wrapped(*a, **kw):
        with record_function(name):
            return fn(*a, **kw)
    return wrapped


def _mark_spans() -> None:
    """Wrap SpecDecoder.propose (PROPOSE) and the functions of MARKED in record_function spans; a
    function a module lacks is skipped."""
    import importlib

    SpecDecoder.propose = _span(PROPOSE, SpecDecoder.propose)
    for module_name, (cls_name, fns) in MARKED.items():
        module = importlib.import_module(module_name)
        owner = getattr(module, cls_name, None) if cls_name else module
        for fn in fns:
            if owner is None or not hasattr(owner, fn):
                continue
            name = f"span.{cls_name or module_name.rsplit('.', 1)[1]}.{fn}"
            original = getattr(owner, fn)
            wrapped = _span(name, original)
            if cls_name is not None:
                setattr(owner, fn, wrapped)
            else:  # a module's function: also where other modules imported it by name
                for mod in list(sys.modules.values()):
                    if getattr(mod, fn, None) is original:
                        setattr(mod, fn, wrapped)


def runtime_calls(events, within: list[tuple[int, int]] | None) -> dict[str, int]:
    """CUDA runtime calls by kind, all of them or only those starting inside `within` intervals."""
    out = Counter()
    for e in events:
        kind = next((k for k, names in RUNTIME.items() if e.name in names), None)
        if kind is None:
            continue
        if within is not None and not any(a <= e.time_range.start < b for a, b in within):
            continue
        out[kind] += 1
    return dict(out)


def _after_first(token_times: list[float]) -> float | None:
    """ms per token after the first one arrived: the decode rate without the prompt's step (one
    step in a short run weighs much: 48 tokens at 5 ms and one 20 ms prefill step), what a gate's
    cost against no speculation is read from."""
    tail = len(token_times) - token_times.count(token_times[0]) if token_times else 0
    if tail < 1:
        return None
    return round((token_times[-1] - token_times[0]) * 1e3 / tail, 3)


def profile_method(args, name: str, spec: dict | None, rows: list[dict]) -> dict:
    engine = LLMEngine(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                       load_format=args.load_format, speculative_config=spec)
    if engine.tokenizer is not None:
        prompt = encode_prompts(engine.tokenizer, rows)[0]
    else:  # a preset with dummy weights: random ids (what drafting and verifying cost, not acceptance)
        prompt = random_prompts(1, 256, engine.model_config.vocab_size, seed=1)[0]
    run_requests(engine, [prompt], args.osl, stream=True)  # warm-up: kernels, the gate's first choice
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    engine.step_times.reset()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        r = run_requests(engine, [prompt], args.osl, stream=True)
        wall = time.perf_counter() - t0
    steps = max(r["steps"], 1)
    events = prof.events()
    marked = [e for e in events if e.name.startswith(("span.", PROPOSE)) and e.device_type == DeviceType.CPU]
    spans = [(e.time_range.start, e.time_range.end) for e in marked if e.name == PROPOSE]
    total = runtime_calls(events, None)
    inside = runtime_calls(events, spans)
    table = prof.key_averages()
    top = sorted((e for e in table if not e.key.startswith(("cuda", "cu", PROPOSE, "ProfilerStep", "span."))),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    runtime = sorted((e for e in table if e.key.startswith("cu")), key=lambda e: e.self_cpu_time_total,
                     reverse=True)[: args.top]
    span_us, span_calls = Counter(), Counter()  # the host's spans (the trace repeats each on the GPU)
    for e in marked:
        span_us[e.name] += e.time_range.elapsed_us()
        span_calls[e.name] += 1
    row = {"method": name, "steps": r["steps"], "output_tokens": len(r["token_times"]),
           "wall_ms_per_token": round(wall * 1e3 / max(len(r["token_times"]), 1), 3),
           "after_first_ms_per_token": _after_first(r["token_times"]),
           "runtime_calls_per_step": {k: round(v / steps, 1) for k, v in sorted(total.items())},
           "proposals": len(spans), "propose_ms_per_proposal": round(span_us[PROPOSE] / 1e3 / max(len(spans), 1), 3),
           "runtime_calls_per_proposal": {k: round(v / max(len(spans), 1), 1) for k, v in sorted(inside.items())},
           "top_host_ops": [{"op": e.key, "calls_per_step": round(e.count / steps, 1),
                             "self_cpu_us_per_step": round(e.self_cpu_time_total / steps, 1)} for e in top],
           "runtime_calls": [{"call": e.key, "calls_per_step": round(e.count / steps, 1),
                              "cpu_us_per_step": round(e.self_cpu_time_total / steps, 1)} for e in runtime],
           "spans": [{"span": name, "calls_per_step": round(span_calls[name] / steps, 2),
                      "us_per_call": round(us / span_calls[name], 1), "us_per_step": round(us / steps, 1)}
                     for name, us in span_us.most_common()],
           "step_times": engine.step_times.summary()}
    if args.trace_dir:
        Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.trace_dir) / f"{name}.json.gz"))
    engine.shutdown()
    del engine
    free_memory()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="target folder or preset (default: the default model)")
    ap.add_argument("--load-format", default="auto", help="dummy: random weights, the drafters' too "
                    "(bench/data/dummy-drafters has config-only drafters for llama-3.1-8b)")
    ap.add_argument("--draft-model", default=None)
    ap.add_argument("--eagle-head", default=None)
    ap.add_argument("--kind", default="chat", help="the shipped prompt set's kind to decode")
    ap.add_argument("--osl", type=int, default=48)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--trace-dir", default=None, help="also write each method's Chrome trace here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    _mark_spans()
    always = {"num_speculative_tokens": args.k, "disable_when_slower": False}
    runs = [("none", None), ("ngram-always", {"method": "ngram", **always})]
    if args.draft_model:
        runs.append(("draft_model-always", {"method": "draft_model", "model": args.draft_model, **always}))
    if args.eagle_head:
        runs.append(("eagle3-always", {"method": "eagle3", "model": args.eagle_head, **always}))
        runs.append(("eagle3", {"method": "eagle3", "model": args.eagle_head, "num_speculative_tokens": args.k}))
    rows = [r for r in load_prompts(None) if r["kind"] == args.kind][-1:]
    results = [profile_method(args, name, spec, rows) for name, spec in runs]
    write_result({"benchmark": "spec_profile_batch1", "config": vars(args), "machine": machine_info(),
                  "results": results}, args.out)
    for r in results:
        print(f"{r['method']:20s} {r['wall_ms_per_token']:7.3f} ms/token ({r['after_first_ms_per_token']} after "
              f"the first)  calls/step {r['runtime_calls_per_step']}  "
              f"propose {r['propose_ms_per_proposal']} ms {r['runtime_calls_per_proposal']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
