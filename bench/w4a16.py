"""Micro-benchmark of the W4A16 GEMM at Llama-3.1-8B's linear shapes against BF16 cuBLAS.

For qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down 14336->4096 (group 128, asymmetric) and
M = 1, 4, 16, 64, 256, 1024, 8192: the time of the default path (choose_config), of every other
path, and of F.linear on the BF16 weight, measured in the same run; achieved bandwidth counts the
bytes actually read and written (packed weights + scales + zeros + x + y), as a share of the
device-to-device copy bandwidth measured in the same run; TFLOP/s; the speed-up over BF16.
Times: triton.testing.do_bench (median, L2 flushed) and, for M <= 64, through a CUDA graph (as the
engine runs decode), on weight sets rotated past the L2 cache. Below M = 1024 each shape also times
the int->float unpacking (label -i2f; gemv-i2f-bn16: the gemv tile that shipped with it) beside
the default fast one, and at M = 1 the gemv beside the default (mm on a 16-row x tile). --sweep adds a sweep of the gemv and small-M mm tiles (M = 1, 16, 64) and
prints the five best per shape with their copy-bandwidth share.

    python bench/w4a16.py --out bench/results/w4a16-h200.json [--sweep]   # on the GPU machine
    TRITON_INTERPRET=1 python bench/w4a16.py --quick                      # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from taxiway_kernels.w4a16_reference import W4A16Weight  # noqa: E402

from bench.kernels import Timer, bench_env, rotating, run_meta  # noqa: E402

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
MS = [1, 4, 16, 64, 256, 1024, 8192]
GROUP = 128
DT = torch.bfloat16
ROTATE_BYTES = 256 << 20


def _weights(n: int, k: int, device: str, copies: int) -> list[W4A16Weight]:
    out = []
    for _ in range(copies):
        qweight = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device=device)
        scales = (torch.rand(n, k // GROUP, device=device) * 0.01 + 0.001).to(DT)
        zeros = torch.randint(0, 16, (n, k // GROUP), dtype=torch.uint8, device=device)
        out.append(W4A16Weight(qweight, scales, zeros, GROUP))
    return out


def _copies(nbytes: int, quick: bool) -> int:
    return 2 if quick else max(2, min(16, -(-ROTATE_BYTES // max(1, nbytes))))


def _label(cfg) -> str:
    return cfg.path + ("-swap" if cfg.swap_ab else "") + ("-i2f" if cfg.unpack == "i2f" else "")


def _paths(m: int, n: int, k: int, device: torch.device):
    """(label, config) of every path worth timing at this M; the default first. Below
    DEQUANT_MIN_M this includes the default tiles with the other unpacking (fast or -i2f) and, at
    M = 1, the 16-row gemv tile that shipped with I2F (gemv-i2f-bn16) and the mm path on a 16-row
    x tile, both unpackings (mm-swap, mm-swap-i2f)."""
    from dataclasses import replace

    from taxiway_kernels._triton_compat import sm_count
    from taxiway_kernels.w4a16 import W4A16Config, _split, choose_config, gemv_config

    default = choose_config(m, n, k, GROUP, device, DT)
    out = [("default:" + _label(default), default)]
    alts = [W4A16Config("dequant")]
    if default.path != "dequant":
        alts.append(replace(default, unpack="i2f" if default.unpack == "fast" else "fast"))
    if m == 1:  # the gemv, fast and I2F, its 16-row tile that shipped with I2F, the 16-row mm tile
        gemv, small = gemv_config(n, k, GROUP, device), choose_config(16, n, k, GROUP, device, DT)
        alts += [gemv, replace(gemv, unpack="i2f"),
                 replace(gemv, block_n=16, unpack="i2f", split_k=_split(n, 16, k, gemv.block_k, sm_count(device))),
                 small, replace(small, unpack="fast")]
    elif m <= 64:
        alts.append(choose_config(128, n, k, GROUP, device, DT))
    else:
        alts.append(choose_config(m if m >= 1024 else 1024, n, k, GROUP, device, DT)
                    if default.path != "dequant" else choose_config(512, n, k, GROUP, device, DT))
    labels = {out[0][0]}
    for cfg in alts:
        label = _label(cfg) + (f"-bn{cfg.block_n}" if cfg.unpack == "i2f" else "")
        if cfg != default and label not in labels:
            labels.add(label)
            out.append((label, cfg))
    return out


def case(timer: Timer, device: str, name: str, n: int, k: int, m: int, quick: bool) -> dict:
    from taxiway_kernels import w4a16

    wbytes = _weights(n, k, "meta", 1)[0].nbytes()
    ws = _weights(n, k, device, _copies(wbytes, quick))
    x = torch.randn(m, k, device=device, dtype=DT)
    out = torch.empty(m, n, device=device, dtype=DT)
    io = (m * k + m * n) * DT.itemsize
    res = dict(name=name, n=n, k=k, m=m, bytes=wbytes + io, flops=2 * m * n * k, paths={})
    for label, cfg in _paths(m, n, k, torch.device(device)):
        fn = rotating([(w,) for w in ws], lambda w, cfg=cfg: w4a16.w4a16_linear(x, w, out=out, config=cfg))
        t_graph = timer.graph(fn) if m <= 64 else None
        res["paths"][label] = dict(config=cfg.__dict__, t_ms=timer.eager(fn), t_graph_ms=t_graph)
    dense = [torch.randn(n, k, device=device, dtype=DT) for _ in range(_copies(n * k * DT.itemsize, quick))]
    fb = rotating([(d,) for d in dense], lambda d: F.linear(x, d))
    res["bf16"] = dict(bytes=n * k * DT.itemsize + io, t_ms=timer.eager(fb),
                       t_graph_ms=timer.graph(fb) if m <= 64 else None)
    return res


def _sweep_configs(m: int, quick: bool) -> list:
    """gemv tiles (m = 1) and the swapped mm's tiles (16-row x tile at m = 1 as at m = 16)."""
    from taxiway_kernels.w4a16 import W4A16Config

    cfgs = []
    if m == 1:
        cfgs += [W4A16Config("gemv", block_n=bn, block_k=bk, split_k=s, num_warps=nw)
                 for bn, bk, nw in ((16, 1024, 4), (32, 512, 4), (32, 1024, 4), (64, 512, 4),
                                    (32, 1024, 8), (64, 1024, 8), (32, 2048, 8))
                 for s in (1, 2, 4)]
    cfgs += [W4A16Config("mm", block_m=max(16, m), block_n=bn, block_k=128, split_k=s, swap_ab=True,
                         num_warps=nw, num_stages=st)
             for bn, nw, st in ((64, 4, 4), (128, 4, 4), (128, 4, 3), (128, 8, 4), (256, 8, 3))
             for s in (1, 2, 4, 8)]
    return cfgs[:2] + cfgs[-1:] if quick else cfgs


def sweep(timer: Timer, device: str, name: str, n: int, k: int, m: int, quick: bool,
          copy_gbs: float) -> list[dict]:
    """Tiles of the gemv and the swapped mm at one shape (CUDA-graph times); fastest first."""
    from taxiway_kernels import w4a16

    wbytes = _weights(n, k, "meta", 1)[0].nbytes()
    ws = _weights(n, k, device, _copies(wbytes, quick))
    x = torch.randn(m, k, device=device, dtype=DT)
    nbytes = wbytes + (m * k + m * n) * DT.itemsize
    rows = []
    for cfg in _sweep_configs(m, quick):
        fn = rotating([(w,) for w in ws], lambda w, cfg=cfg: w4a16.w4a16_linear(x, w, config=cfg))
        t = timer.graph(fn) or timer.eager(fn)
        gbs = nbytes / t / 1e6
        rows.append(dict(name=name, m=m, config=cfg.__dict__, t_ms=t, gbs=gbs, copy_share=gbs / copy_gbs))
    return sorted(rows, key=lambda r: r["t_ms"])


def _summarise(r: dict, copy_gbs: float) -> None:
    for p in r["paths"].values():
        t = p["t_graph_ms"] or p["t_ms"]
        p.update(gbs=r["bytes"] / t / 1e6, copy_share=r["bytes"] / t / 1e6 / copy_gbs,
                 tflops=r["flops"] / t / 1e9)
    b = r["bf16"]
    tb = b["t_graph_ms"] or b["t_ms"]
    b.update(gbs=b["bytes"] / tb / 1e6, copy_share=b["bytes"] / tb / 1e6 / copy_gbs, tflops=r["flops"] / tb / 1e9)
    best = min(r["paths"], key=lambda lbl: r["paths"][lbl]["t_graph_ms"] or r["paths"][lbl]["t_ms"])
    tbest = r["paths"][best]["t_graph_ms"] or r["paths"][best]["t_ms"]
    default = next(lbl for lbl in r["paths"] if lbl.startswith("default"))
    tdef = r["paths"][default]["t_graph_ms"] or r["paths"][default]["t_ms"]
    r.update(best_path=best, speedup_default_vs_bf16=tb / tdef, speedup_best_vs_bf16=tb / tbest)


def _print(rows: list[dict], copy_gbs: float, device_name: str) -> None:
    print(f"\n{device_name}; device-to-device copy {copy_gbs:,.0f} GB/s (read + write)")
    print(f"{'shape':8} {'M':>5} {'path':16} {'t_us':>9} {'GB/s':>7} {'copy%':>6} {'TFLOP/s':>8} "
          f"{'bf16_us':>9} {'x bf16':>7}")
    for r in rows:
        tb = r["bf16"]["t_graph_ms"] or r["bf16"]["t_ms"]
        for label, p in r["paths"].items():
            t = p["t_graph_ms"] or p["t_ms"]
            print(f"{r['name']:8} {r['m']:5} {label:16} {t * 1e3:9.1f} {p['gbs']:7.0f} "
                  f"{100 * p['copy_share']:5.0f}% {p['tflops']:8.1f} {tb * 1e3:9.1f} {tb / t:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description="W4A16 GEMM micro-benchmark")
    parser.add_argument("--out", help="write results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny run (CPU interpreter smoke)")
    parser.add_argument("--sweep", action="store_true", help="also sweep gemv / small-M tiles")
    parser.add_argument("--ms", type=int, nargs="+", help=f"batch sizes M (default {MS}); the sweep "
                        "runs at those of 1, 16, 64")
    args = parser.parse_args()
    quick, device, device_name, timer, copy_gbs = bench_env(args.quick)
    shapes = [("tiny", 256, 512)] if quick else SHAPES
    ms = args.ms or ([1, 4, 64] if quick else MS)
    rows, sweeps = [], []
    meta = run_meta(device_name, copy_gbs, quick, group_size=GROUP)

    def save(complete: bool) -> None:  # after each shape: a run cut short keeps what it measured
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(meta=meta, complete=complete, results=rows, sweep=sweeps), f, indent=1)

    for name, n, k in shapes:
        for m in ms:
            print(f"{name} M={m} ...", file=sys.stderr, flush=True)
            r = case(timer, device, name, n, k, m, quick)
            _summarise(r, copy_gbs)
            rows.append(r)
            if device == "cuda":
                torch.cuda.empty_cache()
        save(False)
    _print(rows, copy_gbs, device_name)
    for name, n, k in shapes if args.sweep else []:
        for m in (1, 16, 64) if args.ms is None else sorted({1, 16, 64} & set(ms)):
            best = sweep(timer, device, name, n, k, m, quick, copy_gbs)[:5]
            for r in best:
                print(f"sweep {r['name']:8} M={r['m']:<3} {r['t_ms'] * 1e3:8.1f} us "
                      f"{100 * r['copy_share']:4.0f}%  {r['config']}", flush=True)
            sweeps.extend(best)
            save(False)
    save(True)

if __name__ == "__main__":
    main()
