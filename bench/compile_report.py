"""Compile every kernel for sm_90 (H100/H200) without a GPU and report its resources.

Runs on the CPU machine: Triton's own ptxas compiles the kernels at Llama-3.1-8B shapes through
the real wrappers (a stand-in driver answers "sm_90", launches only compile), then cuobjdump
reads registers, spills and shared memory from each cubin. Catches kernels that the
interpreter accepts but the GPU compiler rejects, and register spills, before any GPU time.

    python bench/compile_report.py [--out report.json] [--only w4a16] [--sass]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: this script compiles for the GPU")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia import driver as nv_driver  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _Sm90Driver(nv_driver.CudaDriver):
    """Answers as an H100 would; only compilation is ever asked of it."""

    def __init__(self) -> None:  # no CUDA library to load
        pass

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


COMPILED: list[tuple[str, object]] = []


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _ORIGINAL_RUN(self, *args, grid=grid, warmup=True, **kwargs)
    COMPILED.append((self.fn.__name__, kernel))
    return kernel


_ORIGINAL_RUN = JITFunction.run


SASS_OPS = ("I2F", "I2FP", "LOP3", "SHF", "PRMT", "FADD", "FFMA", "FMUL", "HADD2", "HMUL2", "HFMA2",
            "LDG", "LDGSTS", "STS", "LDS", "LDSM", "HGMMA", "BAR", "SHFL")


def _cuobjdump(kernel, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True, check=True).stdout


def _loop_sass(kernel) -> dict:
    """Opcode counts of the kernel's longest loop (a backward branch's span) in the SASS: the
    instructions one thread issues per main-loop step ("loop_instrs"), and those of SASS_OPS."""
    ins = []
    for line in _cuobjdump(kernel, "-sass").splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)[.\w]*(.*)", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    loops = [(int(t.group(1), 16), addr) for addr, op, rest in ins if op == "BRA"
             for t in [re.search(r"0x([0-9a-f]+)", rest)] if t and int(t.group(1), 16) < addr]
    lo, hi = max(loops, key=lambda span: span[1] - span[0]) if loops else (0, -1)
    body = [op for addr, op, _ in ins if lo <= addr <= hi]
    return {"loop_instrs": len(body), **{f"loop_{op}": body.count(op) for op in SASS_OPS}}


def _pair_asm_mismatches(kernel) -> int:
    """Inline-asm calls on 16-bit pairs (taxiway_kernels/w4a16_unpack.py, pack=2 over join(p, p)) whose two
    32-bit word operands differ: the two elements of a packed pair must come from the same word."""
    calls = re.findall(r'asm [^"]*"(?:[^"\\]|\\.)*", "[^"]*"\(([^)]*)\)', kernel.asm["llir"])
    pairs = [[a.split()[-1] for a in c.split(",")] for c in calls if "<2 x" in c and c.count(",") == 3]
    return sum(a[0] != a[1] for a in pairs)


def _resources(kernel, sass: bool = False) -> dict:
    text = _cuobjdump(kernel, "--dump-resource-usage")
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    ptx = kernel.asm["ptx"]
    return {
        "regs": int(regs.group(1)) if regs else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
        "local_bytes": int(local.group(1)) if local else None,
        "shared_bytes": kernel.metadata.shared,
        "num_warps": kernel.metadata.num_warps,
        "num_stages": kernel.metadata.num_stages,
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma_sync": ptx.count("mma.sync"),
        "cp_async": ptx.count("cp.async"),
        "ld_v4": len(re.findall(r"ld\.global[.\w]*\.v4", ptx)),
        "ld_shared_b8": len(re.findall(r"ld\.shared\.b8", ptx)),  # byte-wide shared loads (FP8 V's operand)
        "pair_asm_mismatches": _pair_asm_mismatches(kernel),
        **(_loop_sass(kernel) if sass else {}),
    }


def _calls(dtype: torch.dtype) -> list[tuple[str, callable]]:
    from taxiway_kernels import activation, norm, rotary, triton_attention as A
    from taxiway_kernels.testing import make_cos_sin_cache, make_paged_batch

    g = torch.Generator().manual_seed(0)
    heads = dict(num_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype, generator=g)
    dec = make_paged_batch([(1, 64)] * 4, **heads)
    pre = make_paged_batch([(1, 64), (48, 80)], **heads)
    scale = 128**-0.5
    x = torch.randn(4, 4096, dtype=dtype)
    qkv = torch.randn(4, 48 * 128, dtype=dtype)
    q, k, v = qkv.view(4, 48, 128).split([32, 8, 8], dim=1)
    cache = torch.randn(8, 8, 16, 128, dtype=dtype)
    attn = (dec.q, dec.k_cache, dec.v_cache, dec.block_tables, dec.query_start_loc, dec.seq_lens)
    return [
        ("decode splits=1", lambda: A.paged_decode_attention(*attn, scale, num_splits=1)),
        ("decode splits=16", lambda: A.paged_decode_attention(*attn, scale, num_splits=16)),
        ("decode fp8 kv", lambda: A.paged_decode_attention(
            dec.q, *(c.to(torch.float8_e4m3fn) for c in (dec.k_cache, dec.v_cache)),
            *attn[3:], scale, num_splits=16)),
        ("decode fp8 kv token-major V", lambda: A.paged_decode_attention(
            dec.q, dec.k_cache.to(torch.float8_e4m3fn),
            dec.v_cache.to(torch.float8_e4m3fn).transpose(2, 3).contiguous().transpose(2, 3),
            *attn[3:], scale, num_splits=16)),
        ("prefill", lambda: A.paged_prefill_attention(
            pre.q, pre.k_cache, pre.v_cache, pre.block_tables, pre.query_start_loc,
            pre.seq_lens, scale)),
        ("prefill fp8 kv", lambda: A.paged_prefill_attention(
            pre.q, *(c.to(torch.float8_e4m3fn) for c in (pre.k_cache, pre.v_cache)), pre.block_tables,
            pre.query_start_loc, pre.seq_lens, scale)),
        ("prefill window", lambda: A.paged_prefill_attention(
            pre.q, pre.k_cache, pre.v_cache, pre.block_tables, pre.query_start_loc,
            pre.seq_lens, scale, sliding_window=32)),
        ("rope+kv", lambda: rotary.rope_and_write_kv(
            q, k, v, torch.arange(4), make_cos_sin_cache(64, 128), cache, cache.clone(),
            torch.arange(4))),
        ("rms_norm 4096", lambda: norm.rms_norm(x, torch.ones(4096, dtype=dtype), 1e-6)),
        ("rms_norm per-head", lambda: norm.rms_norm(q, torch.ones(128, dtype=dtype), 1e-6)),
        ("fused_add_rms_norm", lambda: norm.fused_add_rms_norm(
            x.clone(), x.clone(), torch.ones(4096, dtype=dtype), 1e-6)),
        ("silu_and_mul", lambda: activation.silu_and_mul(torch.randn(4, 2 * 14336, dtype=dtype))),
        *_w4a16_calls(dtype),
        *_fp8_gemm_calls(dtype),
        *(_sampling_calls() if dtype == torch.float32 else []),  # logits are float32
    ]


def _w4a16_calls(dtype: torch.dtype) -> list[tuple[str, callable]]:
    """The W4A16 GEMM's paths at Llama-3.1-8B's o_proj shape (4096 x 4096, group 128)."""
    from taxiway_kernels import w4a16
    from taxiway_kernels.w4a16_reference import W4A16Weight

    n = k = 4096
    w = W4A16Weight(torch.zeros(n, k // 8, dtype=torch.int32), torch.ones(n, k // 128, dtype=dtype),
                    torch.zeros(n, k // 128, dtype=torch.uint8), 128)
    cfg = w4a16.choose_config
    dev = torch.device("cpu")

    def run(m: int, c: w4a16.W4A16Config | None = None):
        c = c or cfg(m, n, k, 128, dev, dtype)
        return lambda: w4a16.w4a16_linear(torch.zeros(m, k, dtype=dtype), w, config=c)

    split = w4a16.W4A16Config("gemv", block_n=16, block_k=1024, split_k=4)
    gemv = w4a16.gemv_config(n, k, 128, dev)
    i2f = [("w4a16 gemv i2f", run(1, w4a16.W4A16Config("gemv", block_n=gemv.block_n, block_k=1024, unpack="i2f"))),
           ("w4a16 mm m=16 i2f", run(16, w4a16.W4A16Config("mm", block_n=128, block_k=128, swap_ab=True,
                                                           num_stages=4, unpack="i2f")))]
    return [("w4a16 m=1", run(1)), ("w4a16 gemv m=1", run(1, gemv)), ("w4a16 gemv split-k", run(1, split)),
            ("w4a16 mm m=16", run(16)), ("w4a16 mm m=64", run(64)), ("w4a16 mm m=256", run(256)),
            ("w4a16 dequant", run(2048, w4a16.W4A16Config("dequant"))), *(i2f if dtype != torch.float32 else [])]


def _fp8_gemm_calls(dtype: torch.dtype) -> list[tuple[str, callable]]:
    """The small-M FP8 GEMM (taxiway_kernels/fp8_gemv.py) at Llama-3.1-8B's o_proj shape (4096 x 4096)."""
    from taxiway_kernels import fp8_gemv
    from taxiway_kernels.fp8_gemv import FP8SmallMConfig

    n = k = 4096
    w, ws = torch.zeros(n, k, dtype=torch.float8_e4m3fn), torch.ones(n)

    def run(m: int, c: FP8SmallMConfig | None = None):
        c = c or fp8_gemv.choose_config(m, n, k, torch.device("cpu"))
        return lambda: fp8_gemv.fp8_linear_small_m(torch.zeros(m, k, dtype=torch.float8_e4m3fn),
                                                   torch.ones(m, 1), w, ws, None, dtype, config=c)

    return [("fp8 mma m=1", run(1)), ("fp8 mma m=16", run(16)), ("fp8 mma m=64", run(64)),
            ("fp8 mma last-split", run(1, FP8SmallMConfig(split_k=4, reduce="last_split"))),
            ("fp8 gemv m=1", run(1, FP8SmallMConfig("gemv", block_n=16, block_k=512, split_k=2)))]


def _sampling_calls() -> list[tuple[str, callable]]:
    """Every sampling kernel, through a Sampler whose slots use every feature (128,256 vocabulary)."""
    from gpu_engine.sampler import Sampler
    from gpu_engine.sampling_params import SamplingParams

    vocab = 128256
    sampler = Sampler(8, vocab, "cpu", backend="triton")
    for i, p in enumerate([SamplingParams(temperature=0.8, top_k=50, top_p=0.95, min_p=0.05,
                                          repetition_penalty=1.1, min_tokens=2, stop_token_ids=(5,)),
                           SamplingParams(temperature=0)]):
        sampler.set_slot(i, p, key=7 + i, prompt_token_ids=[1, 2, 3], eos_token_ids=[0])
    logits = torch.randn(2, vocab)
    slots = torch.arange(2)
    return [("sampling", lambda: sampler.sample(logits, slots)),
            ("sampling probs", lambda: sampler.probs(logits, slots))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--only", default="", help="compile only the cases whose name starts so (e.g. w4a16)")
    parser.add_argument("--sass", action="store_true", help="also count the SASS of each kernel's main loop")
    args = parser.parse_args()
    from taxiway_kernels import _triton_compat

    _triton_compat.ALLOW_CPU_TENSORS = True
    driver.set_active(_Sm90Driver())
    JITFunction.run = _compile_only
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for name, call in _calls(dtype):
            if not name.startswith(args.only):
                continue
            COMPILED.clear()
            call()
            for kname, kernel in COMPILED:
                rows.append({"case": name, "dtype": str(dtype).split(".")[1], "kernel": kname,
                             **_resources(kernel, args.sass)})
    cols = ["case", "dtype", "kernel", "regs", "stack_bytes", "local_bytes", "shared_bytes",
            "num_warps", "num_stages", "wgmma", "mma_sync", "cp_async", "ld_v4", "ld_shared_b8"]
    if args.sass:
        cols += ["loop_instrs"] + [f"loop_{op}" for op in SASS_OPS]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
