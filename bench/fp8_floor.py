"""How far the GPU FP8 engine is from the CPU reference engine, and which part of it the distance
comes from: the tiny random Llama of the tests, FP8 W8A8 with an FP8 or BF16 KV cache, float32,
eager steps, under six variants (the GPU FP8 tests' floor is the torch_ops one):

    default               Triton ops, FP8 GEMMs as dispatched (small-M kernel up to 64 rows, else _scaled_mm)
    all_scaled_mm         every FP8 GEMM through torch._scaled_mm
    all_small_m           every FP8 GEMM through the small-M kernel (fails beyond its tiles: listed)
    torch_ops             the torch reference ops, FP8 GEMMs as dispatched
    ref_linear            Triton ops, the dequantizing float32 linear instead of FP8 GEMMs
    torch_ops+ref_linear  the whole reference on the GPU

Per variant: first generated tokens that agree with the CPU's, the largest first-token logprob
difference, whole 24-token outputs equal, and the prompt logprobs' largest and mean difference.
Call T4 (bench/results/2026-12-04-callT4-fp8-floor-h200.json): the whole reference on the GPU equals
the CPU engine and the Triton ops with the dequantizing linear differ by 1e-6, so the FP8 GEMMs are
the only source. Call T1 (-callT1-fp8-floor-bisect-h200.*, the same variants from an untracked copy
of this script) ran before the reference divided as the kernels do, and its whole-reference
variant was 0.011-0.014 from the CPU.

    python bench/fp8_floor.py --out fp8-floor.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_engine.quant.fp8 as quant_fp8  # noqa: E402
import gpu_engine.runner as runner_module  # noqa: E402
from gpu_engine.ops import TorchOps  # noqa: E402
from taxiway import LLM, SamplingParams  # noqa: E402
from taxiway.benchmarks import machine_info  # noqa: E402
from taxiway_kernels import fp8_gemm  # noqa: E402
from taxiway_kernels import reference as R  # noqa: E402
from tests.engine.hf import random_prompts  # noqa: E402
from tests.tiny_models import make_tiny_checkpoint  # noqa: E402

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
SCORE = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
PROMPTS = random_prompts(16, 320, seed=5, lengths=[1, 2, 7, 15, 16, 17, 33, 64, 65, 100, 130, 200, 5, 9, 40, 80])
VARIANTS = {"default": {}, "all_scaled_mm": {"small_m": 0}, "all_small_m": {"small_m": 1 << 30},
            "torch_ops": {"torch_ops": True}, "ref_linear": {"ref_linear": True},
            "torch_ops+ref_linear": {"torch_ops": True, "ref_linear": True}}


def outputs(llm):
    outs = llm.generate(PROMPTS, GREEDY)
    scored = llm.generate(PROMPTS, SCORE)
    lps = torch.tensor([lp[t] for o in scored for lp, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])],
                       dtype=torch.float64)
    return [o.outputs[0] for o in outs], lps


@contextlib.contextmanager
def variant(small_m=None, torch_ops=False, ref_linear=False):
    saved = fp8_gemm.SMALL_M_MAX, runner_module.select_ops, quant_fp8.fp8_linear
    if small_m is not None:
        fp8_gemm.SMALL_M_MAX = small_m
    if torch_ops:
        runner_module.select_ops = lambda device: TorchOps()
    if ref_linear:
        quant_fp8.fp8_linear = R.fp8_linear
    try:
        yield
    finally:
        fp8_gemm.SMALL_M_MAX, runner_module.select_ops, quant_fp8.fp8_linear = saved


def compare(got, lps, cpu, cpu_lps) -> dict:
    same_first = [(g, w) for g, w in zip(got, cpu) if g.token_ids[0] == w.token_ids[0]]
    first = max(abs(g.logprobs[0][g.token_ids[0]] - w.logprobs[0][w.token_ids[0]]) for g, w in same_first)
    d = (lps - cpu_lps).abs()
    return {"first_agree": len(same_first), "first_lp_max": round(first, 5),
            "same_seqs": sum(g.token_ids == w.token_ids for g, w in zip(got, cpu)),
            "prompt_lp_max": round(float(d.max()), 5), "prompt_lp_mean": round(float(d.mean()), 6)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (sm_89+)")
    model = Path(tempfile.mkdtemp()) / "llama"
    make_tiny_checkpoint("llama", model)
    rows = []
    for kv in ("fp8", "auto"):
        kw = {"dtype": "float32", "num_kv_blocks": 256, "max_model_len": 512, "quantization": "fp8",
              "kv_cache_dtype": kv}
        cpu, cpu_lps = outputs(LLM(str(model), device="cpu", **kw))
        for name, v in VARIANTS.items():
            try:
                with variant(**v):
                    got, lps = outputs(LLM(str(model), device="cuda", enforce_eager=True, **kw))
                rows.append({"kv": kv, "variant": name, **compare(got, lps, cpu, cpu_lps)})
            except Exception as e:  # noqa: BLE001 - a variant that cannot run is listed
                rows.append({"kv": kv, "variant": name, "error": repr(e)[:300]})
            print(rows[-1], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"benchmark": "fp8_floor", "machine": machine_info(),
                                              "command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
