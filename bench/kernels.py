"""Micro-benchmark of the Triton kernels at Llama-3.1-8B shapes (32 heads, 8 KV heads, head_dim
128, hidden 4096, intermediate 14336), bf16.

For each kernel: the bytes it must move (each input read once, each output written once), its
median time, achieved GB/s and the share of the device-to-device copy bandwidth measured in the
same run (TFLOP/s for prefill), and a baseline in the same run: the torch reference, or
torch's scaled_dot_product_attention on a dense (unpaged) copy of the same K/V.

Times: triton.testing.do_bench (median, L2 flushed between calls) on inputs rotated among
several sets; kernels also through a CUDA graph (do_bench_cudagraph), which is how the engine
runs decode and removes Python launch overhead.

    python bench/kernels.py --out bench/results/kernels-h100.json      # on the GPU machine
    TRITON_INTERPRET=1 python bench/kernels.py --quick                 # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from taxiway_kernels import reference as R  # noqa: E402
from taxiway_kernels.testing import make_cos_sin_cache, make_paged_batch  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTER = 32, 8, 128, 4096, 14336
DT = torch.bfloat16
ROTATE_BYTES = 256 << 20  # rotate input sets until this many bytes: several times the 50 MB L2


class Timer:
    """Median milliseconds of fn(); on the GPU with triton.testing, on the CPU with a host clock."""

    def __init__(self, quick: bool) -> None:
        self.gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") == "0"
        self.quick = quick

    def eager(self, fn) -> float:
        if not self.gpu:
            fn()
            times = []
            for _ in range(2 if self.quick else 5):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return sorted(times)[len(times) // 2]
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def graph(self, fn) -> float | None:
        if not self.gpu:
            return None
        import triton.testing

        try:
            return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking the rest
            print(f"  graph timing failed: {type(e).__name__}: {e}", file=sys.stderr)
            return None


def rotating(sets: list, call):
    """fn() that calls call(*set) on the next input set each time."""
    state = {"i": 0}

    def fn():
        s = sets[state["i"] % len(sets)]
        state["i"] += 1
        return call(*s)

    return fn


def n_sets(bytes_per_set: int, quick: bool) -> int:
    return 2 if quick else max(1, min(8, math.ceil(ROTATE_BYTES / max(1, bytes_per_set))))


def copy_bandwidth(timer: Timer, device: str, quick: bool) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    n = (1 << 20) if quick else (1 << 30)
    src = torch.randn(n // 2, device=device, dtype=DT)
    dst = torch.empty_like(src)
    t = timer.eager(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / t / 1e6


def bench_env(quick: bool) -> tuple[bool, str, str, Timer, float]:
    """(quick, device, device name, timer, copy GB/s) of a kernel micro-benchmark: under
    TRITON_INTERPRET=1 the CPU interpreter (patched, always quick), else the GPU if there is one."""
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    quick = quick or interp
    if interp:
        from taxiway_kernels._triton_compat import patch_interpreter

        patch_interpreter()
    device = "cuda" if torch.cuda.is_available() and not interp else "cpu"
    device_name = (torch.cuda.get_device_name() if device == "cuda"
                   else f"CPU interpreter ({platform.processor() or 'cpu'})")
    torch.manual_seed(0)
    timer = Timer(quick)
    return quick, device, device_name, timer, copy_bandwidth(timer, device, quick)


def run_meta(device_name: str, copy_gbs: float, quick: bool, **extra) -> dict:
    """What a micro-benchmark's JSON says of its run: card, commit, command, dtype, torch."""
    from taxiway.benchmarks import commit_id

    commit = commit_id()
    return dict(device=device_name, commit=commit, command=" ".join(sys.argv), dtype=str(DT), **extra,
                torch=torch.__version__, copy_gbs=copy_gbs, quick=quick)


def decode_case(timer, device, batch, ctx, quick):
    from taxiway_kernels import triton_attention as A

    kv_bytes = batch * ctx * KV_HEADS * HEAD_DIM * 2 * DT.itemsize
    copies = n_sets(kv_bytes, quick)
    b = make_paged_batch([(1, ctx)] * batch, num_heads=HEADS, num_kv_heads=KV_HEADS,
                         head_dim=HEAD_DIM, dtype=DT, device=device, copies=copies)
    qs = [torch.randn_like(b.q) for _ in range(copies)]
    out = torch.empty_like(b.q)
    sets = [(qs[c], b.block_tables[c * batch:(c + 1) * batch]) for c in range(copies)]
    splits = A.choose_num_splits(batch, KV_HEADS, b.q.device)

    def call(q, bt):
        A.paged_attention(q, b.k_cache, b.v_cache, bt, b.query_start_loc, b.seq_lens,
                          HEAD_DIM**-0.5, out=out, max_query_len=1, num_splits=splits)

    fn = rotating(sets, call)
    io = 2 * b.q.numel() * DT.itemsize + batch * (ctx // 16 + 2) * 4
    res = dict(bytes=kv_bytes + io, flops=4 * batch * HEADS * HEAD_DIM * ctx,
               t_ms=timer.eager(fn), t_graph_ms=timer.graph(fn), num_splits=splits)
    if not quick and kv_bytes <= (12 << 30):  # dense baseline needs a second copy of the KV
        k = torch.randn(batch, KV_HEADS, ctx, HEAD_DIM, device=device, dtype=DT)
        v = torch.randn_like(k)
        q4 = b.q.view(batch, HEADS, 1, HEAD_DIM)
        res["baseline"] = "sdpa dense"
        res["t_base_ms"] = _try(timer, lambda: F.scaled_dot_product_attention(
            q4, k, v, scale=HEAD_DIM**-0.5, enable_gqa=True))
    return res


def prefill_case(timer, device, n_seqs, q_len, ctx, quick):
    from taxiway_kernels import triton_attention as A

    b = make_paged_batch([(q_len, ctx)] * n_seqs, num_heads=HEADS, num_kv_heads=KV_HEADS,
                         head_dim=HEAD_DIM, dtype=DT, device=device)
    out = torch.empty_like(b.q)
    qs = [torch.randn_like(b.q) for _ in range(2)]

    def call(q):
        A.paged_attention(q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc,
                          b.seq_lens, HEAD_DIM**-0.5, out=out, max_query_len=q_len)

    fn = rotating([(q,) for q in qs], call)
    pairs = n_seqs * sum(ctx - q_len + j + 1 for j in range(q_len))  # (query, key) pairs seen
    kv_bytes = n_seqs * ctx * KV_HEADS * HEAD_DIM * 2 * DT.itemsize
    res = dict(bytes=kv_bytes + 2 * b.q.numel() * DT.itemsize, flops=4 * HEADS * HEAD_DIM * pairs,
               t_ms=timer.eager(fn), t_graph_ms=None)
    if not quick and ctx == q_len:
        q4 = b.q.view(n_seqs, q_len, HEADS, HEAD_DIM).transpose(1, 2)
        k = torch.randn(n_seqs, KV_HEADS, ctx, HEAD_DIM, device=device, dtype=DT)
        res["baseline"] = "sdpa causal"
        res["t_base_ms"] = _try(timer, lambda: F.scaled_dot_product_attention(
            q4, k, k, is_causal=True, scale=HEAD_DIM**-0.5, enable_gqa=True))
    return res


def _try(timer, fn):
    try:
        return timer.eager(fn)
    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported as missing
        print(f"  baseline failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def elementwise_case(timer, device, op, tokens, quick):
    from taxiway_kernels import activation, norm

    width = 2 * INTER if op.startswith("silu_and_mul") else HIDDEN
    per_set = tokens * width * DT.itemsize * (2 if op == "fused_add_rms_norm" else 1)
    sets = [(torch.randn(tokens, width, device=device, dtype=DT),
             torch.randn(tokens, width, device=device, dtype=DT) if op == "fused_add_rms_norm"
             else None) for _ in range(n_sets(per_set, quick))]
    w = torch.randn(HIDDEN, device=device, dtype=DT)
    elems = tokens * width
    if op == "rms_norm":
        out = torch.empty(tokens, width, device=device, dtype=DT)
        kernel = lambda x, _: norm.rms_norm(x, w, 1e-5, out=out)  # noqa: E731
        base = lambda x, _: R.rms_norm(x, w, 1e-5)  # noqa: E731
        nbytes = 2 * elems * DT.itemsize
    elif op == "fused_add_rms_norm":
        kernel = lambda x, r: norm.fused_add_rms_norm(x, r, w, 1e-5)  # noqa: E731
        base = lambda x, r: R.fused_add_rms_norm(x, r, w, 1e-5)  # noqa: E731
        nbytes = 4 * elems * DT.itemsize
    elif op == "silu_and_mul_fp8":  # FP8 per-token output: one pass over the row against two
        kernel = lambda x, _: activation.silu_and_mul_quant_fp8(x, one_pass=True)  # noqa: E731
        fn = rotating(sets, kernel)
        two = rotating(sets, lambda x, _: activation.silu_and_mul_quant_fp8(x, one_pass=False))
        return dict(bytes=elems * DT.itemsize + elems // 2 + 4 * tokens, flops=0, t_ms=timer.eager(fn),
                    t_graph_ms=timer.graph(fn), baseline="two passes", t_base_ms=timer.graph(two) or timer.eager(two))
    else:
        out = torch.empty(tokens, INTER, device=device, dtype=DT)
        kernel = lambda x, _: activation.silu_and_mul(x, out=out)  # noqa: E731
        base = lambda x, _: R.silu_and_mul(x)  # noqa: E731
        nbytes = elems * DT.itemsize * 3 // 2
    fn = rotating(sets, kernel)
    return dict(bytes=nbytes, flops=0, t_ms=timer.eager(fn), t_graph_ms=timer.graph(fn),
                baseline="torch reference", t_base_ms=timer.eager(rotating(sets, base)))


def rope_case(timer, device, tokens, quick):
    from taxiway_kernels.rotary import rope_and_write_kv

    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    num_blocks = tokens // 16 + 1
    cache = [torch.randn(num_blocks, KV_HEADS, 16, HEAD_DIM, device=device, dtype=DT)
             for _ in range(2)]
    cos_sin = make_cos_sin_cache(8192, HEAD_DIM).to(device)
    sets = []
    for _ in range(n_sets(tokens * width * DT.itemsize, quick)):
        qkv = torch.randn(tokens, width, device=device, dtype=DT).view(tokens, -1, HEAD_DIM)
        q, k, v = qkv.split([HEADS, KV_HEADS, KV_HEADS], dim=1)
        pos = torch.randint(0, 8192, (tokens,), device=device)
        slots = torch.randperm(num_blocks * 16, device=device)[:tokens]
        sets.append((q, k, v, pos, cos_sin, *cache, slots))
    fn = rotating(sets, rope_and_write_kv)
    kv = tokens * KV_HEADS * HEAD_DIM * DT.itemsize
    nbytes = 2 * tokens * HEADS * HEAD_DIM * DT.itemsize + 4 * kv + tokens * (16 + 4 * HEAD_DIM)
    return dict(bytes=nbytes, flops=0, t_ms=timer.eager(fn), t_graph_ms=timer.graph(fn),
                baseline="torch reference", t_base_ms=timer.eager(rotating(sets, R.rope_and_write_kv)))


def cases(quick: bool):
    """(name, shape, function(timer, device) -> result dict)."""
    if quick:
        dec = [(2, 40)]
        pre, tokens = [(2, 24, 40)], 16
    else:
        dec = [(b, c) for b in (1, 32, 256) for c in (1024, 4096, 8192)]
        pre, tokens = [(8, 1024, 1024), (8, 512, 4096)], 8192
    out = [(f"decode b={b} ctx={c}", f"{b}x{c}", lambda t, d, b=b, c=c: decode_case(t, d, b, c, quick))
           for b, c in dec]
    out += [(f"prefill {n}x{q} ctx={c}", f"{n}x{q}/{c}",
             lambda t, d, n=n, q=q, c=c: prefill_case(t, d, n, q, c, quick)) for n, q, c in pre]
    out.append(("rope+kv write", f"{tokens} tok", lambda t, d: rope_case(t, d, tokens, quick)))
    for op in ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "silu_and_mul_fp8"):
        w = 2 * INTER if op.startswith("silu_and_mul") else HIDDEN
        out.append((op, f"{tokens}x{w}", lambda t, d, op=op: elementwise_case(t, d, op, tokens, quick)))
    return out


def _finish(name, shape, r, copy_gbs):
    t = r["t_graph_ms"] or r["t_ms"]
    r.update(name=name, shape=shape, gbs=r["bytes"] / t / 1e6, tflops=r["flops"] / t / 1e9,
             copy_share=r["bytes"] / t / 1e6 / copy_gbs)
    if r.get("t_base_ms"):
        r["speedup_vs_base"] = r["t_base_ms"] / t
    return r


def _print_table(rows, copy_gbs, device_name):
    print(f"\n{device_name}; device-to-device copy {copy_gbs:,.0f} GB/s (read + write)")
    head = f"{'kernel':28} {'shape':12} {'t_us':>9} {'eager_us':>9} {'GB/s':>7} {'copy%':>6} {'TFLOP/s':>8} {'base_us':>9} {'x base':>7}"
    print(head)
    for r in rows:
        tg = f"{r['t_graph_ms'] * 1e3:9.1f}" if r["t_graph_ms"] else f"{'-':>9}"
        base = f"{r['t_base_ms'] * 1e3:9.1f} {r['speedup_vs_base']:7.2f}" if r.get("t_base_ms") else f"{'-':>9} {'-':>7}"
        print(f"{r['name']:28} {r['shape']:12} {tg} {r['t_ms'] * 1e3:9.1f} {r['gbs']:7.0f} "
              f"{100 * r['copy_share']:5.0f}% {r['tflops']:8.1f} {base}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Triton kernel micro-benchmark")
    parser.add_argument("--out", help="write results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter smoke)")
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    args = parser.parse_args()
    quick, device, device_name, timer, copy_gbs = bench_env(args.quick)
    rows = []
    for name, shape, run in cases(quick):
        if args.only not in name:
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows.append(_finish(name, shape, run(timer, device), copy_gbs))
        if device == "cuda":
            torch.cuda.empty_cache()
    _print_table(rows, copy_gbs, device_name)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=run_meta(device_name, copy_gbs, quick), results=rows), f, indent=1)


if __name__ == "__main__":
    main()
