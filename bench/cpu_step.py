"""Host time per decode step with N running sequences: everything `LLMEngine.step()` does on the
CPU (planning, input update and upload, launch bookkeeping, collection, update, output assembly),
through the engine's own code, with a stand-in model that does no math (one tiny embedding gather
and a [hidden, 64] matmul). This is the work the overlapped loop must hide under the GPU's step.

    python bench/cpu_step.py --seqs 256 1024 2048 4096 --before e76b2f2 --out bench/results/X.json

`--settings bench` runs the engine as `taxiway bench throughput` does (no prefix caching,
guaranteed_no_evict); `--settings api` with the engine's own defaults, as `LLM(...)` users get them
(prefix caching on, max_utilization). `--driver engine` steps the engine directly, as the bench's
loop does; `--driver llm` runs `LLM.generate` (its own loop and output assembly) to the end and
times the interval between successive steps, so the loop's work between steps counts too. Pool,
batch size, budget and context length are the run's own in every mode, and the stand-in has no
tokenizer (a preset such as llama-3.1-8b has none either: no text is decoded).

    python bench/cpu_step.py --seqs 256 1024 --settings api --driver llm

`--output-kind delta` (engine driver) streams every request's new tokens every step, as the
executor of `taxiway serve` asks for them; the default, final, reports each request once at the end
(the offline bench).

`--before REV` runs the same measurement on the code of git revision REV (exported to a temporary
folder) in a subprocess, and writes both figures into one JSON. On a CUDA machine the stand-in runs
on the GPU (real pinned uploads, CUDA-graph replays of the input preparation); `host_ms` is the
step's wall time minus its wait for the device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64
HIDDEN = 8


def _import_root(root: str) -> None:
    sys.path.insert(0, root)


def tiny_config(folder: Path) -> None:
    """A one-layer Llama config: the KV cache and the runner's buffers stay small."""
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64,
           "vocab_size": VOCAB, "max_position_embeddings": 1 << 16, "rms_norm_eps": 1e-5,
           "eos_token_id": VOCAB - 1, "bos_token_id": 0, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(cfg))


def stand_in_model(device):
    """The CausalLM interface without the math: hidden = a tiny embedding, logits = one matmul."""
    import torch
    from torch import nn

    class StandIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.Parameter(torch.ones(HIDDEN, device=device))  # the runner reads its dtype
            self.embed = nn.Parameter(torch.randn(VOCAB, HIDDEN, device=device))
            self.head = nn.Parameter(torch.randn(HIDDEN, VOCAB, device=device))

        def forward(self, input_ids, positions, kv_caches, meta, cos_sin, ops):
            return self.embed[input_ids]  # [T, HIDDEN]

        def forward_aux(self, input_ids, positions, kv_caches, meta, cos_sin, ops, aux_layers):
            return self.forward(input_ids, positions, kv_caches, meta, cos_sin, ops), None

        def compute_logits(self, hidden):
            return hidden @ self.head  # [S, VOCAB] f32

    return StandIn()


SETTINGS = ("bench", "api")


def settings_kwargs(name: str) -> dict:
    """The engine settings of a --settings choice: the bench's own (taxiway.benchmarks, less its
    model), or none (the engine's defaults)."""
    if name == "api":
        return {}
    from taxiway.benchmarks import GPU_ENGINE_DEFAULTS

    return {k: v for k, v in GPU_ENGINE_DEFAULTS.items() if k not in ("model", "load_format")}


WARM_STEPS = 8  # the prefill, then a few decode steps, before timing


def engine_kwargs(num_seqs: int, context: int, steps: int, device_name: str, overlap: bool, settings: str,
                  folder: str) -> dict:
    """EngineConfig keywords: a pool and budget sized for the run, then the chosen settings."""
    max_len = context + steps + 64
    return {"model": folder, "load_format": "dummy", "device": device_name,
            "num_kv_blocks": num_seqs * (-(-max_len // 16) + 1), "max_num_seqs": num_seqs,
            "max_num_batched_tokens": max(8192, num_seqs * context), "max_model_len": max_len,
            "async_scheduling": overlap, **settings_kwargs(settings)}


def use_stand_in(engine) -> None:
    """Swap the engine's model for the stand-in (graphs recaptured on a GPU)."""
    engine.runner.model = stand_in_model(engine.device)
    if engine.device.type == "cuda" and engine.runner.graphs is not None:
        engine.runner.graphs = None
        engine.runner.capture_graphs()


def prompts(num_seqs: int, context: int) -> list[list[int]]:
    """Lengths staggered over a block, as arrivals stagger them in a real run."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB - 1, context + i % 16).tolist() for i in range(num_seqs)]


def measure(num_seqs: int, context: int, steps: int, device_name: str, overlap: bool, settings: str = "bench",
            driver: str = "engine", output_kind: str = "final") -> dict:
    import torch

    torch.set_num_threads(1)  # tiny ops: threads only add contention on a shared machine
    with tempfile.TemporaryDirectory() as tmp:
        tiny_config(Path(tmp))
        kwargs = engine_kwargs(num_seqs, context, steps, device_name, overlap, settings, tmp)
        if driver == "llm":
            walls, parts, extra = drive_llm(kwargs, num_seqs, context, steps)
        else:
            walls, parts, extra = drive_engine(kwargs, num_seqs, context, steps, output_kind)
    wall_ms = sorted(walls)[len(walls) // 2] * 1e3  # median: the machine may be shared
    host_ms = wall_ms - parts.get("wait_ms", 0.0)
    return {"seqs": num_seqs, "context": context, "steps": steps, "settings": settings, "driver": driver,
            "output_kind": output_kind,
            "running": extra.pop("running"), "mean_wall_ms": round(sum(walls) / len(walls) * 1e3, 3),
            "wall_ms": round(wall_ms, 3), "host_ms": round(host_ms, 3),
            "us_per_seq": round(host_ms * 1e3 / num_seqs, 2),
            "parts": {k: v for k, v in parts.items() if k.endswith("_ms")}, **extra}


def drive_engine(kwargs: dict, num_seqs: int, context: int, steps: int, output_kind: str = "final"):
    """The bench's loop: requests added to the engine, engine.step() timed call by call; each
    request reports at the end (final) or streams its new tokens every step (delta)."""
    import torch

    from gpu_engine.engine import LLMEngine
    from gpu_engine.sampling_params import OutputKind, SamplingParams

    engine = LLMEngine(**kwargs)
    use_stand_in(engine)
    params = SamplingParams(max_tokens=steps + 32, temperature=0.0, ignore_eos=True, detokenize=False,
                            output_kind=OutputKind.DELTA if output_kind == "delta" else OutputKind.FINAL_ONLY)
    for i, prompt in enumerate(prompts(num_seqs, context)):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(WARM_STEPS):
        engine.step()
    engine.step_times.reset()
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    parts = engine.step_times.summary().get("decode", {})
    extra = {"running": len(engine.scheduler.running)}
    engine.abort_request(list(engine.requests))
    while engine.has_unfinished_requests():
        engine.step()
    return walls, parts, extra


def drive_llm(kwargs: dict, num_seqs: int, context: int, steps: int):
    """LLM.generate to the end (greedy, EOS ignored, default SamplingParams otherwise, as the
    `--api llm` bench runs it); each timed interval runs from one engine.step() call to the next,
    so it holds the step and generate's own work after it."""
    from gpu_engine.llm import LLM
    from gpu_engine.sampling_params import SamplingParams

    llm = LLM(**kwargs)
    engine = llm.engine
    use_stand_in(engine)
    starts: list[float] = []
    seen: dict = {}
    step = engine.step

    def timed_step():
        starts.append(time.perf_counter())
        if len(starts) == WARM_STEPS + 1:
            engine.step_times.reset()
            seen["running"] = len(engine.scheduler.running)
        elif len(starts) == WARM_STEPS + steps + 1:
            seen["parts"] = engine.step_times.summary().get("decode", {})
        return step()

    engine.step = timed_step
    t0 = time.perf_counter()
    outs = llm.generate(prompts(num_seqs, context), SamplingParams(max_tokens=steps + 2 * WARM_STEPS,
                                                                   temperature=0.0, ignore_eos=True))
    total = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    walls = [b - a for a, b in zip(starts[WARM_STEPS:WARM_STEPS + steps], starts[WARM_STEPS + 1:])]
    extra = {"running": seen["running"], "generate_s": round(total, 3), "step_calls": len(starts),
             "generated_tokens": generated}
    return walls, seen["parts"], extra


def run_rows(args) -> list[dict]:
    rows = []
    for n in args.seqs:
        row = measure(n, args.context, args.steps, args.device, not args.sync, args.settings, args.driver,
                      args.output_kind)
        rows.append(row)
        print(f"{n:5d} seqs: {row['host_ms']:8.2f} ms host/step  {row['us_per_seq']:6.2f} us/seq  "
              + "  ".join(f"{k}={v:.2f}" for k, v in row["parts"].items()), file=sys.stderr)
    return rows


def before_rows(rev: str, args) -> dict:
    """Run this script on the code of `rev` (git archive into a temporary folder)."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--code-root", tmp, "--rows-only",
               "--context", str(args.context), "--steps", str(args.steps), "--device", args.device,
               "--settings", args.settings, "--driver", args.driver, "--output-kind", args.output_kind,
               "--seqs", *map(str, args.seqs)] + (["--sync"] if args.sync else [])
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        if out.returncode != 0:
            raise RuntimeError(f"the run at {commit} failed:\n{out.stderr[-4000:]}")
        sys.stderr.write(out.stderr)
    return {"commit": commit, "rows": json.loads(out.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    ap.add_argument("--context", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=30, help="decode steps timed per size")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sync", action="store_true", help="no async scheduling (the CPU engine's default); "
                    "by default the loop overlaps as on a GPU, feeding decodes from the device")
    ap.add_argument("--settings", choices=SETTINGS, default="bench",
                    help="bench: no prefix caching, guaranteed_no_evict (taxiway bench throughput); api: the "
                         "engine's defaults (prefix caching, max_utilization), as LLM(...) has them")
    ap.add_argument("--driver", choices=("engine", "llm"), default="engine",
                    help="engine: engine.step() in a loop (the bench's); llm: LLM.generate to the end")
    ap.add_argument("--output-kind", choices=("final", "delta"), default="final",
                    help="final: each request reports once, at the end; delta: every request streams its "
                         "new tokens every step (what the executor of taxiway serve asks for); engine driver")
    ap.add_argument("--before", default=None, metavar="REV", help="also measure git revision REV")
    ap.add_argument("--out", default=None)
    ap.add_argument("--code-root", default=str(REPO), help=argparse.SUPPRESS)
    ap.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver == "llm" and args.output_kind == "delta":
        ap.error("--output-kind delta takes the engine driver (LLM.generate returns final outputs)")
    _import_root(args.code_root)
    if args.rows_only:
        print(json.dumps(run_rows(args)))
        return
    from taxiway.benchmarks import machine_info

    result = {"benchmark": "cpu_step", "machine": machine_info(), "command": " ".join(sys.argv),
              "what": "host ms per decode step (median wall of LLMEngine.step() minus its mean device wait) "
                      "with a stand-in model (no math); parts are the engine's StepTimes (means)",
              "async_scheduling": not args.sync, "settings": args.settings, "driver": args.driver,
              "output_kind": args.output_kind,
              "load_average_at_start": os.getloadavg()}
    if args.before:
        result["before"] = before_rows(args.before, args)
    result["after"] = {"commit": result["machine"]["commit"], "rows": run_rows(args)}
    result["load_average_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
