"""Micro-benchmark of the sampling kernels (Sampler.sample on the GPU) at real vocabularies.

For each (vocabulary, rows, parameters, logits shape): the median device time of one
Sampler.sample call (triton.testing.do_bench: CUDA events around the call, so launch gaps count),
the host time of issuing it, the share of rows that took each path (band / slow), and in the same
run the baselines: a greedy argmax over the same logits, and the per-step torch path the engine
runs today (gpu_engine.sampler.sample with a prebuilt SamplingBatch; its host-side batch building
not counted). The bandwidth floor is one read of the logits at the copy bandwidth measured here.

Logits: "dummy" is N(0, 1.3^2) per token, what the random-weight benchmark models produce (a
wide nucleus); "peaked" is a trained model's shape (N(0, 3^2) plus a few boosted tokens).

    python bench/sampling_kernels.py --out bench/results/sampling-kernels-h200.json   # on the GPU
    TRITON_INTERPRET=1 python bench/sampling_kernels.py --quick                       # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from gpu_engine.sampler import SamplingBatch, Penalties, Sampler, row_key, sample  # noqa: E402
from gpu_engine.sampling_params import SamplingParams as SP  # noqa: E402

PARAMS = {
    "greedy": SP(temperature=0.0),
    "greedy+rep1.1": SP(temperature=0.0, repetition_penalty=1.1),
    "t0.8": SP(temperature=0.8),
    "t0.8+k50+p0.95": SP(temperature=0.8, top_k=50, top_p=0.95),
    "t0.8+k50+p0.95+rep1.1": SP(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1),
    "t0.8+p0.95": SP(temperature=0.8, top_p=0.95),
    "t1+minp0.05": SP(temperature=1.0, min_p=0.05),
}


class Timer:
    def __init__(self, quick: bool) -> None:
        self.gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") == "0"
        self.quick = quick

    def device_us(self, fn) -> float:
        if not self.gpu:
            return self.host_us(fn)
        import triton.testing

        return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")

    def host_us(self, fn) -> float:
        fn()
        times = []
        for _ in range(1 if self.quick else 20):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
            if self.gpu:
                torch.cuda.synchronize()
        return sorted(times)[len(times) // 2]


def make_logits(rows: int, vocab: int, shape: str, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(rows)
    x = torch.randn(rows, vocab, generator=g, device=device)
    if shape == "dummy":
        return x * 1.3
    x = x * 3.0
    x[:, :16] += 6 * torch.rand(rows, 16, generator=g, device=device)
    return x


def make_sampler(params: SP, rows: int, vocab: int, device, cfg) -> Sampler:
    s = Sampler(rows, vocab, device, backend="triton", kernel_config=cfg)
    prompt = list(range(1, 129))
    for slot in range(rows):
        s.set_slot(slot, params, row_key(slot, 0), prompt_token_ids=prompt, output_token_ids=[5] * 8,
                   eos_token_ids=[0])
    return s


def legacy_batch(params: SP, rows: int, vocab: int, device) -> SamplingBatch:
    """What step_inputs builds today for `rows` requests with these parameters (on the device)."""
    full = lambda v, dt=torch.float32: torch.full((rows,), v, dtype=dt, device=device)  # noqa: E731
    pen = None
    if params.needs_penalties:
        prompt = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        prompt[:, 1:129] = True
        counts = torch.zeros(rows, vocab, device=device)
        counts[:, 5] = 8
        pen = Penalties(rows=torch.arange(rows, device=device), prompt_mask=prompt, output_counts=counts,
                        repetition=full(params.repetition_penalty), presence=full(params.presence_penalty),
                        frequency=full(params.frequency_penalty))
    return SamplingBatch(
        temperature=full(params.temperature), top_k=full(params.top_k, torch.int64),
        top_p=full(params.top_p), min_p=full(params.min_p),
        keys=torch.arange(rows, device=device, dtype=torch.int64), positions=full(8, torch.int64),
        all_greedy=params.temperature == 0, any_top_k=params.top_k > 0, any_top_p=params.top_p < 1,
        any_min_p=params.min_p > 0, penalties=pen)


def copy_gbs(timer: Timer, device, quick: bool) -> float:
    n = (1 << 20) if quick else (1 << 28)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timer.device_us(lambda: dst.copy_(src)) / 1e3


def case(timer, device, cfg, vocab, rows, name, shape, gbs) -> dict:
    params = PARAMS[name]
    logits = make_logits(rows, vocab, shape, device)
    sampler = make_sampler(params, rows, vocab, device, cfg)
    slots = torch.arange(rows, device=device)
    call = lambda: sampler.sample(logits, slots)  # noqa: E731
    t_us = timer.device_us(call)
    host_us = timer.host_us(call) if timer.gpu else t_us
    paths = sampler._ws.paths(rows).tolist() if sampler._ws.rows else []  # none: the argmax fast path
    batch = legacy_batch(params, rows, vocab, device)
    t_legacy = timer.device_us(lambda: sample(logits, batch))
    t_argmax = timer.device_us(lambda: logits.argmax(dim=-1))
    floor_us = rows * vocab * 4 / gbs / 1e3
    return dict(name=name, vocab=vocab, rows=rows, logits=shape, t_us=t_us, host_us=host_us,
                argmax_us=t_argmax, legacy_us=t_legacy, floor_us=floor_us,
                floor_share=floor_us / t_us, speedup_vs_legacy=t_legacy / t_us,
                band_share=paths.count(2) / max(1, len(paths)), slow_share=paths.count(3) / max(1, len(paths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 64, 512, 4096])
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        from taxiway_kernels._triton_compat import patch_interpreter

        patch_interpreter()
    from taxiway_kernels.sampling import SamplingKernelConfig

    timer = Timer(args.quick)
    device = "cuda" if timer.gpu else "cpu"
    if args.quick:
        cfg = SamplingKernelConfig(chunk=256, block=128, pivot_block=64, band_cap=256, band_block=128,
                                   rows_per_program=4)
        grid = [(600, 4)]
        names = ["greedy", "t0.8+k50+p0.95+rep1.1", "t0.8+p0.95"]
    else:
        cfg = SamplingKernelConfig()
        grid = [(vocab, rows) for vocab in (128256, 151936) for rows in args.rows]
        names = list(PARAMS)
    gbs = copy_gbs(timer, device, args.quick)
    rows_out = []
    for vocab, rows in grid:
        for shape in ("dummy", "peaked"):
            for name in names:
                r = case(timer, device, cfg, vocab, rows, name, shape, gbs)
                rows_out.append(r)
                print(f"{vocab:>7} {rows:>5} {shape:<6} {name:<22} {r['t_us']:9.1f} us  host {r['host_us']:7.1f}"
                      f"  argmax {r['argmax_us']:8.1f}  legacy {r['legacy_us']:9.1f}  floor {r['floor_us']:8.1f}"
                      f"  band {r['band_share']:.2f} slow {r['slow_share']:.2f}", flush=True)
    if args.out:
        name = torch.cuda.get_device_name(0) if timer.gpu else platform.processor() or "cpu"
        from taxiway.benchmarks import commit_id

        commit = commit_id()
        meta = dict(device=name, commit=commit, command=" ".join(sys.argv), copy_gbs=gbs,
                    config=cfg.__dict__, torch=torch.__version__)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=rows_out), f, indent=1)


if __name__ == "__main__":
    main()
