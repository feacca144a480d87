"""Sweep the attention kernels' tiling knobs on the GPU, at Llama-3.1-8B shapes (bf16 queries; a
BF16 or FP8 KV cache, block size 16 unless a case says otherwise).

Each variant's output is checked against the default configuration's (which the tests check
against the reference) before it is timed through a CUDA graph (do_bench_cudagraph, median).
Prints, per case, the default and the five fastest variants; --out writes every row as JSON.

    python bench/kernels_sweep.py --only decode --out sweep-decode.json
    python bench/kernels_sweep.py --only prefill --out sweep-prefill.json
    python bench/kernels_sweep.py --only "ctx=3072" --out sweep-t2.json   # the T2 2048/2048 shapes
    python bench/kernels_sweep.py --only "ctx=3072 fp8" --out sweep-fp8.json   # FP8 KV, block 16 only
    python bench/kernels_sweep.py --only "decode b=1" --skip "ctx=8192" --out sweep-t1-128.json  # T1 128/128
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton.testing  # noqa: E402

from taxiway_kernels import triton_attention as A  # noqa: E402
from taxiway_kernels.testing import make_paged_batch, rel_err  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DT = torch.bfloat16


def _variants(kind: str, auto_splits: int, fp8: bool):
    """JSON-ready configurations (a dtype by name)."""
    if kind == "decode" and fp8:  # float16 dots: they won by 1.4x over bfloat16 at the T2 shape (call N1)
        for bn, w, st, sp in itertools.product((64, 128, 256), (4, 8), (2, 3, 4), sorted({auto_splits, 2 * auto_splits})):
            yield dict(block_n=bn, num_warps=w, num_stages=st, num_splits=sp, fp8_dot_dtype="float16")
    elif kind == "decode":
        splits = sorted({max(1, auto_splits // 2), auto_splits, min(64, auto_splits * 2)})
        for bn, w, st, sp in itertools.product((32, 64, 128), (4, 8), (1, 2, 3), splits):
            yield dict(block_n=bn, num_warps=w, num_stages=st, num_splits=sp)
    else:
        for bm, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
            yield dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)


def _sweep_case(kind: str, seqs: list[tuple[int, int]], kv: str = "bf16", block_size: int = 16):
    """Every variant of one case; kv "fp8": the cache in float8_e4m3fn (scales 1.0), as
    kv_cache_dtype="fp8" stores it; a "-vt" suffix: V token-major (each block stored [head_dim,
    block_size]). Decode rows also give the KV bytes read per microsecond."""
    b = make_paged_batch(seqs, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                         dtype=DT, device="cuda", block_size=block_size)
    k_cache, v_cache = b.k_cache, b.v_cache
    if kv.startswith("fp8"):
        k_cache, v_cache = (c.to(torch.float8_e4m3fn) for c in (k_cache, v_cache))
    if kv.endswith("-vt"):
        v_cache = v_cache.transpose(2, 3).contiguous().transpose(2, 3)
    args = (b.q, k_cache, v_cache, b.block_tables, b.query_start_loc, b.seq_lens, HEAD_DIM**-0.5)
    fn = A.paged_decode_attention if kind == "decode" else A.paged_prefill_attention
    kv_bytes = sum(n for _, n in seqs) * 2 * KV_HEADS * HEAD_DIM * k_cache.element_size()
    ref = fn(*args)
    auto = A.choose_num_splits(len(seqs), KV_HEADS, b.q.device)
    out = torch.empty_like(b.q)
    rows = []
    for cfg in [{}] + list(_variants(kind, auto, kv.startswith("fp8"))):
        kw = {k: getattr(torch, v) if k == "fp8_dot_dtype" else v for k, v in cfg.items()}
        try:
            out.fill_(float("nan"))
            fn(*args, out=out, **kw)
            err = rel_err(out, ref)
            if not err < 1e-2:
                raise AssertionError(f"output differs from the default's: {err:.2e}")
            t = triton.testing.do_bench_cudagraph(lambda: fn(*args, out=out, **kw), rep=30,
                                                  return_mode="median")
            rows.append(dict(cfg=cfg or "default", t_us=t * 1e3, kv_gb_per_s=round(kv_bytes / (t * 1e6), 1)))
        except Exception as e:  # noqa: BLE001 - a variant that fails to compile or run is listed
            rows.append(dict(cfg=cfg or "default", error=f"{type(e).__name__}: {str(e)[:200]}"))
    return rows


CASES = {  # name: (kind, (q_len, seq_len) per sequence[, kv dtype, block size])
    "decode b=1 ctx=8192": ("decode", [(1, 8192)]),
    "decode b=32 ctx=4096": ("decode", [(1, 4096)] * 32),
    "decode b=256 ctx=4096": ("decode", [(1, 4096)] * 256),
    # the decode steps of T1 1000/1000 (331 sequences, BF16 KV) and T2 2048/2048 (249, FP8 KV):
    # a step's GPU time there was 61% and 41% of its bandwidth floor (README, calls M1 / M3)
    "decode b=330 ctx=1500": ("decode", [(1, 1500)] * 330),
    "decode b=330 ctx=1500 block 32": ("decode", [(1, 1500)] * 330, "bf16", 32),
    "decode b=250 ctx=3072 fp8": ("decode", [(1, 3072)] * 250, "fp8"),
    "decode b=250 ctx=3072 block 32 fp8": ("decode", [(1, 3072)] * 250, "fp8", 32),
    "decode b=250 ctx=3072 block 64 fp8": ("decode", [(1, 3072)] * 250, "fp8", 64),
    "decode b=250 ctx=3072": ("decode", [(1, 3072)] * 250),
    # the decode steps of T1 128/128 at max_num_seqs 1024 and 2048 (about 980 and 1,810 sequences
    # at 130-256 tokens of context, call B): short contexts, many sequences
    "decode b=1024 ctx=160": ("decode", [(1, 160)] * 1024),
    "decode b=1800 ctx=190": ("decode", [(1, 190)] * 1800),
    # T2 128/128's decode steps (975 sequences, FP8 KV): 2.25 TB/s in the engine's profile (call T3)
    "decode b=975 ctx=215 fp8": ("decode", [(1, 215)] * 975, "fp8"),
    # V token-major: the FP8 dot's operand without byte loads (bench/compile_report.py: 816 loop
    # instructions per 32 KB tile on sm_90 against 1,314 row-major); not yet an engine layout
    "decode b=250 ctx=3072 fp8 token-major V": ("decode", [(1, 3072)] * 250, "fp8-vt"),
    "decode b=975 ctx=215 fp8 token-major V": ("decode", [(1, 215)] * 975, "fp8-vt"),
    "decode b=330 ctx=1500 token-major V": ("decode", [(1, 1500)] * 330, "bf16-vt"),
    "prefill 8x1024": ("prefill", [(1024, 1024)] * 8),
    "prefill 8x512 ctx=4096": ("prefill", [(512, 4096)] * 8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description="attention tiling sweep (GPU)")
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    parser.add_argument("--skip", default=None, help="skip cases whose name contains this")
    parser.add_argument("--out", help="write every row as JSON here")
    args = parser.parse_args()
    from taxiway.benchmarks import commit_id

    report = {"device": torch.cuda.get_device_name(), "commit": commit_id(),
              "command": " ".join(sys.argv), "torch": torch.__version__, "triton": triton.__version__, "cases": {}}
    for name, (kind, seqs, *layout) in CASES.items():
        if args.only not in name or (args.skip and args.skip in name):
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        report["cases"][name] = _sweep_case(kind, seqs, *layout)
        torch.cuda.empty_cache()
        if args.out:  # after every case: a run cut short by a time limit keeps what it measured
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    print(report["device"])
    for name, rows in report["cases"].items():
        ok = sorted((r for r in rows if "t_us" in r), key=lambda r: r["t_us"])
        default = next((r for r in rows if r["cfg"] == "default"), None)
        failed = sum("error" in r for r in rows)
        print(f"{name}: default {default.get('t_us', float('nan')):.1f} us; {failed} variants failed")
        for r in ok[:5]:
            print(f"   {r['t_us']:8.1f} us  {r['kv_gb_per_s']:7.1f} GB/s  {r['cfg']}")


if __name__ == "__main__":
    main()
