"""FP8 GEMMs against BF16 at Llama-3.1-8B's linear shapes, M = 1 ... 8192 tokens (run on the GPU).

For each (linear, M): BF16 F.linear; FP8 W8A8 as the model runs it (torch._scaled_mm, rowwise
scales: per token x per channel); the same GEMM with tensorwise scales (cuBLASLt's per-tensor
path, for comparison); and the per-token activation quantization (kernels/fp8.py) that o_proj's
input takes. Median times (triton.testing.do_bench_cudagraph, inputs rotated past the L2), TFLOP/s,
the weight bytes read per second, and FP8's speed-up over BF16 in the same run.

    python bench/fp8_gemm.py --out bench/results/fp8-gemm-h200.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.kernels import rotating  # noqa: E402
from kernels import reference as R  # noqa: E402
from taxiway.benchmarks import copy_bandwidth_gbs, machine_info, write_result  # noqa: E402

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
          "down_proj": (4096, 14336)}  # (N, K)
MS = (1, 64, 256, 1024, 8192)
ROTATE_BYTES = 256 << 20


def bench(fn) -> float:
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    except RuntimeError:  # e.g. an op that cannot be captured
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def one_shape(n: int, k: int, m: int) -> dict:
    dev = "cuda"
    copies = max(1, min(8, ROTATE_BYTES // (n * k)))
    bf = [(torch.randn(m, k, device=dev, dtype=torch.bfloat16),
           torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02) for _ in range(copies)]
    q = []
    for x, w in bf:
        xq, xs = R.quantize_fp8(x)
        wq, ws = R.quantize_fp8(w)
        q.append((xq, xs, wq, ws.view(-1).contiguous(), xs.amax().reshape(()), ws.amax().reshape(())))
    t_bf16 = bench(rotating(bf, lambda x, w: F.linear(x, w)))
    t_row = bench(rotating(q, lambda xq, xs, wq, ws, _a, _b: torch._scaled_mm(
        xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16)))
    t_tensor = bench(rotating(q, lambda xq, _xs, wq, _ws, sa, sb: torch._scaled_mm(
        xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)))
    from kernels.fp8 import quantize_fp8

    t_quant = bench(rotating(bf, lambda x, _w: quantize_fp8(x)))
    flop = 2 * m * n * k
    row = {"M": m, "N": n, "K": k}
    for name, t, wbytes in (("bf16", t_bf16, 2 * n * k), ("fp8_rowwise", t_row, n * k),
                            ("fp8_tensorwise", t_tensor, n * k)):
        row[name] = {"ms": round(t, 4), "tflops": round(flop / t / 1e9, 1),
                     "weight_gbs": round(wbytes / t / 1e6, 1)}
    row["quantize_activation_ms"] = round(t_quant, 4)
    row["speedup_rowwise_vs_bf16"] = round(t_bf16 / t_row, 3)
    row["speedup_tensorwise_vs_bf16"] = round(t_bf16 / t_tensor, 3)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=int, nargs="+", default=list(MS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("fp8_gemm.py needs a CUDA GPU (sm_89+)", file=sys.stderr)
        return 1
    rows = []
    for name, (n, k) in SHAPES.items():
        for m in args.ms:
            r = one_shape(n, k, m)
            r["linear"] = name
            rows.append(r)
            print(f"{name:13s} M={m:5d}: bf16 {r['bf16']['ms']:.4f} ms, fp8 rowwise {r['fp8_rowwise']['ms']:.4f} ms "
                  f"({r['speedup_rowwise_vs_bf16']:.2f}x), tensorwise {r['fp8_tensorwise']['ms']:.4f} ms",
                  file=sys.stderr)
    write_result({"benchmark": "fp8_gemm", "command": " ".join(sys.argv), "machine": machine_info(),
                  "copy_bandwidth_gbs": round(copy_bandwidth_gbs(torch.device("cuda")), 1), "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
