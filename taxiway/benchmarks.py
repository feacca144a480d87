"""Offline benchmarks with the trtllm-bench protocol: fixed ISL/OSL, random token ids, EOS ignored,
every request submitted at once (throughput, and a sweep over max_num_seqs in one process), or one
request alone (latency, with its roofline from the bytes a decode step reads)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from gpu_engine.config import EngineConfig, setting
from gpu_engine.engine import LLMEngine
from gpu_engine.roofline import decode_step_bytes, kv_bytes_per_token
from gpu_engine.sampling_params import OutputKind, SamplingParams

APIS = ("engine", "llm")

GPU_ENGINE_DEFAULTS = {"model": "llama-3.1-8b", "load_format": "dummy", "enable_prefix_caching": False,
                       "admission_policy": "guaranteed_no_evict"}
"""The bench's engine settings with a GPU (the trtllm-bench protocol): Llama-3.1-8B with random
weights; every request arrives at once with a fixed length, so reserving prompt + OSL
(guaranteed_no_evict) avoids preemption churn; no prefix caching (prompts are random). Every other
setting is the engine's own default (max_num_seqs sized by the device)."""
CPU_ENGINE_DEFAULTS = {"enable_prefix_caching": False, "admission_policy": "guaranteed_no_evict"}
"""On the CPU: the same protocol on the default model (SmolLM2-135M), which a CPU runs in seconds."""
NUM_REQUESTS = {"gpu": 3000, "cpu": 8}


@dataclass(frozen=True)
class BenchConfig:
    """A benchmark's workload, and the engine settings it overrides (EngineConfig's names; given
    ones win over the bench's defaults for the device, above)."""

    isl: int = setting(128, "prompt tokens per request (random token ids)")
    osl: int = setting(128, "output tokens per request (EOS ignored)")
    num_requests: int | None = setting(
        None, f"requests, all submitted at once (default: {NUM_REQUESTS['gpu']} with a GPU, "
              f"{NUM_REQUESTS['cpu']} on the CPU; latency: 1)")
    api: str = setting(
        "engine", "engine: LLMEngine, no detokenization (the bench driver); llm: what users run, "
                  "LLM(...).generate with default SamplingParams but greedy, max_tokens OSL and EOS "
                  "ignored (text is detokenized), and the engine's own defaults for every setting not "
                  "given")
    engine: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {self.api!r}")
        if self.isl < 1 or self.osl < 1 or (self.num_requests is not None and self.num_requests < 1):
            raise ValueError(f"isl, osl and num_requests must be positive, got {self.isl}, {self.osl}, "
                             f"{self.num_requests}")
        unknown = set(self.engine) - EngineConfig.field_names()
        if unknown:
            raise ValueError(f"unknown engine settings {sorted(unknown)} (see gpu_engine.config.EngineConfig)")

    @property
    def on_gpu(self) -> bool:
        device = str(self.engine.get("device", "auto"))
        return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())

    @property
    def requests(self) -> int:
        """num_requests, or the default for the device."""
        return self.num_requests or NUM_REQUESTS["gpu" if self.on_gpu else "cpu"]

    @property
    def seed(self) -> int:
        """The engine's seed, which seeds the random prompts too."""
        return self.engine.get("seed", EngineConfig.seed)

    def engine_kwargs(self) -> dict:
        """EngineConfig keywords: the bench's defaults for the device, then the given settings;
        max_model_len ISL + OSL unless given."""
        defaults = GPU_ENGINE_DEFAULTS if self.on_gpu else CPU_ENGINE_DEFAULTS
        return {**defaults, "max_model_len": self.isl + self.osl, **self.engine}

    def llm_kwargs(self) -> dict:
        """LLM(...) keywords for api=llm: the model (with its load format) the bench would use and
        the given settings, nothing else (the engine's defaults stand)."""
        model = {k: v for k, v in self.engine_kwargs().items() if k in ("model", "load_format")}
        return {**model, **self.engine}

    def with_engine(self, **settings) -> "BenchConfig":
        return replace(self, engine={**self.engine, **settings})

    def to_dict(self) -> dict:
        """What a result records: the workload and every engine setting the run was built with."""
        return {"isl": self.isl, "osl": self.osl, "num_requests": self.requests, "api": self.api,
                "engine_overrides": dict(self.engine),
                "engine": self.llm_kwargs() if self.api == "llm" else self.engine_kwargs()}


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=gen).tolist()


def run_requests(engine: LLMEngine, prompts: list[list[int]], osl: int, stream: bool = False) -> dict:
    """Submit every prompt at once, step until all finish; returns timings."""
    params = SamplingParams(max_tokens=osl, min_tokens=osl, temperature=0.0, ignore_eos=True,
                            detokenize=False,
                            output_kind=OutputKind.DELTA if stream else OutputKind.FINAL_ONLY)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params)
    token_times: list[float] = []
    generated = steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        now = time.perf_counter()
        for out in outs:
            if stream:
                token_times.extend([now] * len(out.outputs[0].token_ids))
            if out.finished:
                generated += sum(len(c.token_ids) for c in out.outputs) if not stream else 0
    _sync(engine)
    elapsed = time.perf_counter() - start
    if stream:
        generated = len(token_times)
    return {"elapsed_s": elapsed, "generated_tokens": generated, "steps": steps, "token_times": token_times,
            "start": start}


def _sync(engine: LLMEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def machine_info() -> dict:
    info = {"host_cpus": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["card"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["card"] = "cpu"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    info["commit"] = commit_id()
    info["source_sha256"] = source_hash()
    return info


SOURCE_DIRS = ("gpu_engine", "taxiway", "taxiway_kernels", "services", "bench")
"""The folders whose Python files make up what a benchmark ran."""


def source_hash(root: Path | None = None) -> str:
    """SHA-256 (first 16 hex digits) over the Python files of SOURCE_DIRS, by relative path and
    content: what a record's code was, whatever the commit field says (the GPU machine's copy of a
    working tree can carry an older commit's git metadata). `python -m taxiway.benchmarks` prints
    it for a checkout, to match a record to a commit."""
    import hashlib

    root = root or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for folder in SOURCE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def commit_id() -> str:
    """The commit a result was measured at: TAXIWAY_COMMIT (set where the tree has no .git, as on
    the GPU machine), else git's HEAD, else "unknown"."""
    return os.environ.get("TAXIWAY_COMMIT") or _git_commit()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), median of 20."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    t = sorted(times[5:])[len(times[5:]) // 2]
    return 2 * nbytes / t / 1e9


def throughput(cfg: BenchConfig) -> dict:
    if cfg.api == "llm":
        return throughput_llm(cfg)
    t0 = time.perf_counter()
    engine = LLMEngine(**cfg.engine_kwargs())
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm_up(engine, cfg)
    warm = time.perf_counter() - t0
    result = timed_run(engine, cfg)
    return {"benchmark": "throughput", "config": cfg.to_dict(), "machine": machine_info(),
            "engine_settings": engine_settings(engine, detokenize=False),
            "startup_s": round(startup, 2), "warmup_s": round(warm, 2), "num_kv_blocks": engine.num_kv_blocks,
            "graph_capture_s": round(engine.graph_capture_s, 2),
            "shape_warm_up_s": round(engine.warm_up_s, 2), **result}


def engine_settings(engine: LLMEngine, detokenize: bool) -> dict:
    """The settings a run was served with, as the engine resolved them (defaults included);
    text is decoded only where `detokenize` is asked for and the model has a tokenizer (a preset
    has none)."""
    ec = engine.config
    return {"max_num_seqs": engine.max_num_seqs, "max_num_batched_tokens": engine.max_num_batched_tokens,
            "admission_policy": ec.admission_policy, "enable_prefix_caching": ec.enable_prefix_caching,
            "max_model_len": engine.max_model_len, "async_scheduling": engine.async_scheduling,
            "dtype": str(engine.dtype).removeprefix("torch."), "detokenize": detokenize,
            "tokenizer": engine.tokenizer is not None, "v_cache_token_major": ec.v_cache_token_major}


def warm_up(engine: LLMEngine, cfg: BenchConfig) -> None:
    vocab = engine.model_config.vocab_size
    run_requests(engine, random_prompts(min(engine.max_num_seqs, 64, cfg.requests), cfg.isl, vocab, cfg.seed + 1), min(cfg.osl, 16))


def timed_run(engine: LLMEngine, cfg: BenchConfig) -> dict:
    """All of cfg's requests at once through the engine; figures and the engine's step timings."""
    prompts = random_prompts(cfg.requests, cfg.isl, engine.model_config.vocab_size, cfg.seed)
    engine.step_times.reset()
    preempted = engine.scheduler.num_preemptions
    spec = engine.scheduler.spec_stats.snapshot()
    r = run_requests(engine, prompts, cfg.osl)
    if r["generated_tokens"] != cfg.requests * cfg.osl:
        raise RuntimeError(f"generated {r['generated_tokens']} tokens, expected {cfg.requests * cfg.osl}")
    return {
        "max_num_seqs": engine.scheduler.config.max_num_seqs, **_quant_info(engine),
        "elapsed_s": round(r["elapsed_s"], 3),
        "steps": r["steps"], "output_tokens_per_s": round(r["generated_tokens"] / r["elapsed_s"], 1),
        "total_tokens_per_s": round(cfg.requests * (cfg.isl + cfg.osl) / r["elapsed_s"], 1),
        "preemptions": engine.scheduler.num_preemptions - preempted,
        "step_times": engine.step_times.summary(), "kernel_compiles": engine.compile_watch.summary(),
        **_spec_info(engine, spec),
    }


def throughput_llm(cfg: BenchConfig) -> dict:
    """The same protocol through the public API, `LLM(...).generate`, on the engine's defaults."""
    from gpu_engine.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(**cfg.llm_kwargs())
    startup = time.perf_counter() - t0
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=cfg.osl, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate(random_prompts(min(engine.max_num_seqs, 64, cfg.requests), cfg.isl, vocab, cfg.seed + 1),
                 replace(params, max_tokens=min(cfg.osl, 16)))
    warm = time.perf_counter() - t0
    prompts = random_prompts(cfg.requests, cfg.isl, vocab, cfg.seed)
    engine.step_times.reset()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    if generated != cfg.requests * cfg.osl:
        raise RuntimeError(f"generated {generated} tokens, expected {cfg.requests * cfg.osl}")
    return {
        "benchmark": "throughput", "api": "llm", "config": cfg.to_dict(), "machine": machine_info(),
        "engine_settings": engine_settings(engine, params.detokenize),
        "startup_s": round(startup, 2), "warmup_s": round(warm, 2), "num_kv_blocks": engine.num_kv_blocks,
        "elapsed_s": round(elapsed, 3),
        "output_tokens_per_s": round(generated / elapsed, 1),
        "total_tokens_per_s": round(cfg.requests * (cfg.isl + cfg.osl) / elapsed, 1),
        "preemptions": engine.scheduler.num_preemptions, "step_times": engine.step_times.summary(),
        "kernel_compiles": engine.compile_watch.summary(),
    }


def sweep(cfg: BenchConfig, sizes: list[int]) -> dict:
    """The throughput run at each max_num_seqs in `sizes`, in one process: the model is loaded and
    the graphs captured once (for the largest size); each run caps the running batch."""
    if not sizes or any(n < 1 for n in sizes):
        raise ValueError(f"sizes must be positive batch sizes, got {sizes}")
    t0 = time.perf_counter()
    engine = LLMEngine(**cfg.with_engine(max_num_seqs=max(sizes)).engine_kwargs())
    startup = time.perf_counter() - t0
    warm_up(engine, cfg)
    runs = []
    for n in sizes:
        engine.scheduler.limit_running(n)
        run = timed_run(engine, cfg)
        decode = run["step_times"].get("decode", {})
        runs.append({"max_num_seqs": n, "output_tokens_per_s": run["output_tokens_per_s"],
                     "decode_host_ms": decode.get("host_ms"), "decode_gpu_ms": decode.get("gpu_ms"),
                     "decode_mean_seqs": decode.get("mean_seqs"), **run})
        print(f"max_num_seqs {n}: {run['output_tokens_per_s']} output tok/s; decode step host "
              f"{decode.get('host_ms')} ms, GPU {decode.get('gpu_ms')} ms", file=sys.stderr)
    return {"benchmark": "sweep", "config": cfg.to_dict(), "sizes": sizes, "machine": machine_info(),
            "startup_s": round(startup, 2), "num_kv_blocks": engine.num_kv_blocks,
            "graph_capture_s": round(engine.graph_capture_s, 2),
            "shape_warm_up_s": round(engine.warm_up_s, 2), "runs": runs}


def latency(cfg: BenchConfig) -> dict:
    engine = LLMEngine(**cfg.engine_kwargs())
    vocab = engine.model_config.vocab_size
    run_requests(engine, random_prompts(1, cfg.isl, vocab, cfg.seed + 1), min(cfg.osl, 16), stream=True)
    spec = engine.scheduler.spec_stats.snapshot()
    runs = []
    for i in range(3):
        r = run_requests(engine, random_prompts(1, cfg.isl, vocab, cfg.seed + i), cfg.osl, stream=True)
        times = r["token_times"]
        ttft = times[0] - r["start"]
        tpot = (times[-1] - times[0]) / (len(times) - 1)
        runs.append({"ttft_s": ttft, "decode_tokens_per_s": 1.0 / tpot, "time_per_token_ms": tpot * 1e3})
    best = sorted(runs, key=lambda x: x["decode_tokens_per_s"])[len(runs) // 2]
    mc = engine.model_config
    kv_elem = torch.empty((), dtype=engine.runner.kv_dtype).element_size()
    # Rank 0's share (all at tp=1): every rank reads its share at once, so its bytes bound the step.
    read = decode_step_bytes(engine.runner.model, 1, kv_bytes_per_token(mc.num_layers, engine.runner.num_kv_heads,
                                                                         mc.head_dim, kv_elem),
                             cfg.isl + cfg.osl / 2)  # the mean context of the decode steps
    bw = copy_bandwidth_gbs(engine.device)
    roofline_tps = bw * 1e9 / read.total
    return {
        "benchmark": "latency", "config": cfg.to_dict(), "machine": machine_info(), "runs": runs,
        **_quant_info(engine), **_spec_info(engine, spec),
        "decode_tokens_per_s": round(best["decode_tokens_per_s"], 1),
        "time_per_token_ms": round(best["time_per_token_ms"], 3), "ttft_ms": round(best["ttft_s"] * 1e3, 2),
        "bytes_per_token": {"weights": read.weights, "embedding_row": read.embedding_rows, "kv": read.kv,
                            "total": read.total},
        "copy_bandwidth_gbs": round(bw, 1), "roofline_tokens_per_s": round(roofline_tps, 1),
        "share_of_roofline": round(best["decode_tokens_per_s"] / roofline_tps, 3),
    }


def _spec_info(engine: LLMEngine, before) -> dict:
    """Drafted / accepted tokens since the `before` snapshot (nothing without speculation)."""
    if engine.spec is None:
        return {}
    return {"spec_decode": engine.scheduler.spec_stats.since(before).summary()}


def _quant_info(engine: LLMEngine) -> dict:
    """What the run quantized, and the KV pool in blocks of its dtype and of the model's."""
    spec = engine.quant_spec
    return {"quantization": spec.describe() if spec else "unquantized",
            "kv_cache_dtype": str(engine.runner.kv_dtype).removeprefix("torch."),
            "num_kv_blocks_at_model_dtype": engine.num_kv_blocks_at_model_dtype}


def json_safe(value):
    """`value` with every non-finite float (NaN, inf) written as a string ("nan", "inf"): JSON has
    no such numbers, and a result file must parse everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_result(result: dict, out: str | None) -> None:
    text = json.dumps(json_safe(result), indent=2, allow_nan=False)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text, file=sys.stdout)


if __name__ == "__main__":
    print(source_hash())
