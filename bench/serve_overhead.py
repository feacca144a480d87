"""Overhead of the service stack: throughput and time to first token through `taxiway serve`
(gateway -> Redis -> scheduler -> executor, every tier its own process on this machine) versus the
in-process engine, with the same model on the same machine and the same protocol: random token-id
prompts of ISL tokens, OSL tokens each with EOS ignored, every request submitted at once, greedy.

    python bench/serve_overhead.py --isl 64 --osl 32 --num-requests 16 --out bench/results/x.json

The model defaults to the default model (SmolLM2-135M-Instruct); --device/--dtype as the engine's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.redis_server import free_port  # noqa: E402
from taxiway.benchmarks import machine_info, random_prompts  # noqa: E402


def summarize(start: float, first: list[float], end: list[float], tokens: int) -> dict:
    ttft = sorted(t - start for t in first)
    elapsed = max(end) - start
    return {
        "elapsed_s": round(elapsed, 3),
        "output_tokens": tokens,
        "output_tok_s": round(tokens / elapsed, 2),
        "ttft_mean_s": round(statistics.fmean(ttft), 4),
        "ttft_p50_s": round(ttft[len(ttft) // 2], 4),
        "ttft_max_s": round(ttft[-1], 4),
    }


def run_engine(args, prompts: list[list[int]]) -> list[dict]:
    """One in-process engine; a warm-up, then `args.repeat` measured runs."""
    from gpu_engine.engine import LLMEngine
    from gpu_engine.sampling_params import OutputKind, SamplingParams

    engine = LLMEngine(model=args.model, device=args.device, dtype=args.dtype)

    def once(batch, osl):
        params = SamplingParams(max_tokens=osl, min_tokens=osl, temperature=0.0, ignore_eos=True,
                                detokenize=False, output_kind=OutputKind.DELTA)
        start = time.perf_counter()
        for i, p in enumerate(batch):
            engine.add_request(f"r{i}", p, params)
        first, end, tokens = {}, {}, 0
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            for out in outs:
                n = len(out.outputs[0].token_ids)
                tokens += n
                if n:
                    first.setdefault(out.request_id, now)
                if out.finished:
                    end[out.request_id] = now
        return summarize(start, list(first.values()), list(end.values()), tokens)

    once(prompts[:4], 4)  # warm-up
    return [once(prompts, args.osl) for _ in range(args.repeat)]


def run_stack(args, prompts: list[list[int]]) -> list[dict]:
    """One `taxiway serve`; a warm-up, then `args.repeat` measured runs."""
    import grpc

    from services.common.proto import Stub, pb

    port = free_port()
    cfg = {"tokenizer": {"port": free_port()}, "scheduler": {"port": 0}, "executor": {"port": 0},
           "metrics_port": 0}
    for key in ("model", "device", "dtype"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(cfg, f)  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAXIWAY_") and k != "REDIS_URL"}
    proc = subprocess.Popen([sys.executable, "-m", "services.serve", "--config", f.name,
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if "taxiway is serving at" in line:
                break
        else:
            raise RuntimeError("taxiway serve exited before it was ready")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = Stub(channel, "Gateway")

        def once(batch, osl):
            first, end, counts = [0.0] * len(batch), [0.0] * len(batch), [0] * len(batch)
            go = threading.Barrier(len(batch) + 1)

            def one(i):
                req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=batch[i]), sampling=pb.SamplingParams(
                    max_tokens=osl, min_tokens=osl, temperature=0.0, ignore_eos=True))
                go.wait()
                for chunk in stub.Generate(req, timeout=600):
                    if chunk.token_ids and not counts[i]:
                        first[i] = time.perf_counter()
                    counts[i] += len(chunk.token_ids)
                end[i] = time.perf_counter()

            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(batch))]
            for t in threads:
                t.start()
            go.wait()
            start = time.perf_counter()
            for t in threads:
                t.join()
            return summarize(start, first, end, sum(counts))

        once(prompts[:4], 4)  # warm-up
        results = [once(prompts, args.osl) for _ in range(args.repeat)]
        channel.close()
        return results
    finally:
        proc.send_signal(2)
        proc.wait(60)
        os.unlink(f.name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the default model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--isl", type=int, default=64)
    ap.add_argument("--osl", type=int, default=32)
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="measured runs per side (best is reported)")
    ap.add_argument("--out", default=None, help="JSON file (default: bench/results/serve_overhead_<card>_<time>.json)")
    args = ap.parse_args()

    from gpu_engine.engine import LLMEngine  # noqa: F401 - fail early without the engine
    from taxiway.benchmarks import commit_id

    from gpu_engine.default_model import default_model_path

    folder = Path(args.model) if args.model else Path(default_model_path())
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    prompts = random_prompts(args.num_requests, args.isl, vocab, 0)
    load_before = os.getloadavg()
    engine_runs = run_engine(args, prompts)
    stack_runs = run_stack(args, prompts)
    engine = max(engine_runs, key=lambda r: r["output_tok_s"])
    stack = max(stack_runs, key=lambda r: r["output_tok_s"])
    machine = {**machine_info(), "cpu": cpu_model(), "platform": platform.platform(),
               "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    result = {
        "benchmark": "serve_overhead",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit_id(),
        "machine": machine,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "protocol": "random token-id prompts, EOS ignored, all requests submitted at once, greedy; "
                    "engine: LLMEngine.step loop in one process; stack: taxiway serve (4 tier "
                    "processes + embedded Redis) driven over gRPC Generate streams; each side: "
                    "a warm-up, then `repeat` runs, the best one reported (all in *_runs)",
        "engine": engine,
        "stack": stack,
        "engine_runs": engine_runs,
        "stack_runs": stack_runs,
        "stack_vs_engine": {
            "throughput_ratio": round(stack["output_tok_s"] / engine["output_tok_s"], 3),
            "ttft_mean_added_s": round(stack["ttft_mean_s"] - engine["ttft_mean_s"], 4),
            "ttft_p50_added_s": round(stack["ttft_p50_s"] - engine["ttft_p50_s"], 4),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    out = args.out or ROOT / "bench" / "results" / (
        f"serve_overhead_{machine['card'].replace(' ', '_')}_{time.strftime('%Y%m%dT%H%M%S')}.json")
    Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
