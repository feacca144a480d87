"""FP8 GEMMs against BF16 at Llama-3.1-8B's linear shapes, M = 1 ... 8192 tokens (run on the GPU).

For each (linear, M): BF16 F.linear; FP8 W8A8 through torch._scaled_mm with rowwise scales (per
token x per channel) and with tensorwise scales (cuBLASLt's per-tensor path, for comparison); for
M <= 64 the small-M Triton kernel (taxiway_kernels/fp8_gemv.py: its default mma path, the same with the
split-K sum done in the kernel (reduce="last_split") and, for M <= 4, the CUDA-core gemv path);
fp8_linear as the model calls it (whichever it dispatches to); and the per-token activation
quantization (taxiway_kernels/fp8.py) that o_proj's input takes. Median times
(through a CUDA graph, as the engine runs decode; eager where a graph cannot be captured), inputs
rotated past the L2; TFLOP/s; bytes moved (weight + scales + x + y) per second and as a share of
the device-to-device copy bandwidth measured in the same run; the speed-up over BF16.
--sweep adds a sweep of the small-M kernel's tiles at M = 1 and 16 (fastest first).

    python bench/fp8_gemm.py --out bench/results/fp8-gemm-h200.json [--sweep]   # on the GPU machine
    TRITON_INTERPRET=1 python bench/fp8_gemm.py --quick --sweep                 # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.kernels import Timer, bench_env, n_sets, rotating, run_meta  # noqa: E402
from taxiway_kernels import reference as R  # noqa: E402

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
          "down_proj": (4096, 14336)}  # (N, K)
MS = (1, 4, 16, 64, 256, 1024, 8192)
GEMV = dict(path="gemv", block_n=16, block_k=512, split_k=2)


def _time(timer: Timer, fn) -> float:
    return timer.graph(fn) or timer.eager(fn)


def _sets(n: int, k: int, m: int, device: str, quick: bool) -> tuple[list, list]:
    """Rotated inputs: BF16 (x, w) and FP8 (xq, x_scale, wq, w_scale, x_amax_scale, w_amax_scale)."""
    bf = [(torch.randn(m, k, device=device, dtype=torch.bfloat16),
           torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02)
          for _ in range(n_sets(n * k, quick))]
    q = []
    for x, w in bf:
        xq, xs = R.quantize_fp8(x)
        wq, ws = R.quantize_fp8(w)
        q.append((xq, xs, wq, ws.view(-1).contiguous(), xs.amax().reshape(()), ws.amax().reshape(())))
    return bf, q


def _fp8_calls(m: int) -> dict:
    """label -> fn(xq, xs, wq, ws, sa, sb) of every FP8 GEMM timed at this M."""
    from taxiway_kernels.fp8_gemm import SMALL_M_MAX, fp8_linear

    calls = {
        "fp8_rowwise": lambda xq, xs, wq, ws, _a, _b: torch._scaled_mm(
            xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16),
        "fp8_tensorwise": lambda xq, _xs, wq, _ws, sa, sb: torch._scaled_mm(
            xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
        "fp8_linear": lambda xq, xs, wq, ws, _a, _b: fp8_linear(xq, xs, wq, ws),
    }
    if m <= SMALL_M_MAX:
        from taxiway_kernels.fp8_gemv import (
            FP8SmallMConfig,
            choose_config,
            fp8_linear_small_m,
        )

        calls["fp8_small_m"] = lambda xq, xs, wq, ws, _a, _b: fp8_linear_small_m(xq, xs, wq, ws)
        calls["fp8_small_m_last_split"] = lambda xq, xs, wq, ws, _a, _b: fp8_linear_small_m(
            xq, xs, wq, ws, config=_last_split(choose_config(xq.shape[0], wq.shape[0], wq.shape[1], xq.device)))
        if m <= 4:
            gemv = FP8SmallMConfig(**GEMV)
            calls["fp8_gemv"] = lambda xq, xs, wq, ws, _a, _b: fp8_linear_small_m(
                xq, xs, wq, ws, config=gemv)
    return calls


def _last_split(cfg):
    """cfg with its splits summed in the GEMM kernel (by each tile's last split), not by a second launch."""
    return dataclasses.replace(cfg, reduce="last_split")


def _entry(t: float, flop: int, nbytes: int, copy_gbs: float) -> dict:
    gbs = nbytes / t / 1e6
    return {"ms": t, "tflops": flop / t / 1e9, "gbs": gbs, "copy_share": gbs / copy_gbs}


def one_shape(timer: Timer, device: str, n: int, k: int, m: int, copy_gbs: float, quick: bool) -> dict:
    bf, q = _sets(n, k, m, device, quick)
    flop, io = 2 * m * n * k, m * k + 2 * m * n  # x in fp8, y in bf16 (x in bf16 for BF16: + m k)
    row = {"M": m, "N": n, "K": k}
    t_bf16 = _time(timer, rotating(bf, lambda x, w: F.linear(x, w)))
    row["bf16"] = _entry(t_bf16, flop, 2 * n * k + io + m * k, copy_gbs)
    for label, call in _fp8_calls(m).items():
        t = _time(timer, rotating(q, call))
        row[label] = _entry(t, flop, n * k + 4 * (n + m) + io, copy_gbs)
        row[label]["speedup_vs_bf16"] = t_bf16 / t
    from taxiway_kernels.fp8 import quantize_fp8

    row["quantize_activation_ms"] = _time(timer, rotating(bf, lambda x, _w: quantize_fp8(x)))
    return row


def _sweep_configs(m: int):
    from taxiway_kernels.fp8_gemv import FP8SmallMConfig

    block_m = max(16, 1 << (m - 1).bit_length())
    cfgs = [FP8SmallMConfig("mma", block_m=block_m, block_n=bn, block_k=bk, split_k=s, num_stages=st)
            for bn, bk, s, st in itertools.product((16, 32, 64, 128), (128, 256), (1, 2, 4, 8), (4,))]
    # deeper pipelines: narrow tiles without split-K (no reduction pass), and the default's width
    cfgs += [FP8SmallMConfig("mma", block_m=block_m, block_n=bn, block_k=256, split_k=1, num_stages=st)
             for bn, st in itertools.product((16, 32), (6, 8))]
    cfgs += [FP8SmallMConfig("mma", block_m=block_m, block_n=64, block_k=256, split_k=s, num_stages=st)
             for s, st in itertools.product((2, 4), (3, 6))]
    cfgs += [FP8SmallMConfig("mma", block_m=block_m, block_n=bn, block_k=256, split_k=s, reduce="last_split")
             for bn, s in itertools.product((32, 64, 128), (2, 4, 8))]
    if m <= 4:
        cfgs += [FP8SmallMConfig("gemv", block_n=bn, block_k=bk, split_k=s)
                 for bn, bk, s in itertools.product((8, 16, 32), (256, 512), (1, 2, 4))]
    return cfgs


def sweep(timer: Timer, device: str, name: str, n: int, k: int, m: int, copy_gbs: float,
          quick: bool) -> list[dict]:
    """Every swept config of the small-M kernel at one shape; fastest first."""
    from taxiway_kernels.fp8_gemv import fp8_linear_small_m

    _, q = _sets(n, k, m, device, quick)
    cfgs = _sweep_configs(m)
    rows = []
    for cfg in cfgs[:2] if quick else cfgs:
        if k % cfg.block_k:
            continue
        row = dict(linear=name, M=m, N=n, K=k, config=cfg.__dict__)
        fn = rotating(q, lambda xq, xs, wq, ws, _a, _b, cfg=cfg: fp8_linear_small_m(xq, xs, wq, ws, config=cfg))
        try:
            t = _time(timer, fn)
        except Exception as e:  # noqa: BLE001 - a config that fails (resources) is recorded, the sweep goes on
            print(f"sweep {name} M={m} {cfg}: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append(dict(row, ms=None, error=f"{type(e).__name__}: {e}"))
            continue
        rows.append(dict(row, **_entry(t, 2 * m * n * k, n * k + 4 * (n + m) + m * k + 2 * m * n, copy_gbs)))
    return sorted(rows, key=lambda r: float("inf") if r["ms"] is None else r["ms"])  # failures last


def _print(rows: list[dict], device_name: str, copy_gbs: float) -> None:
    print(f"\n{device_name}; device-to-device copy {copy_gbs:,.0f} GB/s (read + write)", file=sys.stderr)
    for r in rows:
        cells = [f"{label} {v['ms'] * 1e3:7.1f} us {100 * v['copy_share']:3.0f}%"
                 + (f" {v['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in v else "")
                 for label, v in r.items() if isinstance(v, dict)]
        print(f"{r['linear']:13s} M={r['M']:5d}: " + " | ".join(cells), file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=int, nargs="+", default=None, help=f"token counts (default {MS})")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny run (CPU interpreter smoke)")
    ap.add_argument("--sweep", action="store_true", help="also sweep the small-M kernel's tiles")
    ap.add_argument("--linears", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                    help="which of the 8B's linears (default all)")
    args = ap.parse_args()
    quick, device, device_name, timer, copy_gbs = bench_env(args.quick)
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        print("fp8_gemm.py needs an sm_89+ GPU (FP8 tensor cores)", file=sys.stderr)
        return 1
    shapes = {"tiny": (96, 512)} if quick else {name: SHAPES[name] for name in args.linears}
    ms = args.ms or ([1, 4, 64] if quick else list(MS))
    rows, sweeps = [], []
    for name, (n, k) in shapes.items():
        for m in ms:
            rows.append({"linear": name, **one_shape(timer, device, n, k, m, copy_gbs, quick)})
        if args.sweep:
            for m in (1, 16):
                sweeps.extend(sweep(timer, device, name, n, k, m, copy_gbs, quick))
    _print(rows, device_name, copy_gbs)
    for s in _best(sweeps):
        print(f"sweep {s['linear']:13s} M={s['M']:<3} {s['ms'] * 1e3:7.1f} us "
              f"{100 * s['copy_share']:3.0f}%  {s['config']}", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(benchmark="fp8_gemm", meta=run_meta(device_name, copy_gbs, quick),
                           rows=rows, sweep=sweeps), f, indent=1)
    return 0


def _best(sweeps: list[dict], per_case: int = 5) -> list[dict]:
    """The per_case fastest configs of each (linear, M) (sweep rows come fastest first per case)."""
    seen: dict[tuple, int] = {}
    out = []
    for s in sweeps:
        if s["ms"] is None:
            continue
        key = (s["linear"], s["M"])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= per_case:
            out.append(s)
    return out


if __name__ == "__main__":
    sys.exit(main())
