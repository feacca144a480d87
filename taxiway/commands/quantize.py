"""`taxiway quantize --method fp8|awq --model DIR --out DIR`: our own calibration, written as a
standard checkpoint (FP8: compressed-tensors, as llm-compressor writes it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a checkpoint (FP8 or INT4 AWQ) into a new folder",
                       description="Quantize an HF checkpoint folder and write a standard quantized checkpoint.")
    p.add_argument("--method", required=True, choices=["fp8", "awq"])
    p.add_argument("--model", required=True, help="HF checkpoint folder (16/32-bit safetensors)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--static-activations", action="store_true",
                   help="fp8: static per-tensor input scales from calibration (default: dynamic per token)")
    p.add_argument("--kv-cache", action="store_true",
                   help="fp8: calibrate per-layer FP8 KV-cache scales (k_scale, v_scale)")
    p.add_argument("--calibration-text", default=None,
                   help="a UTF-8 text file (default: the Python docs topics that ship with CPython)")
    p.add_argument("--num-samples", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--device", default="auto", help="where calibration runs: cpu, cuda or auto")
    p.add_argument("--group-size", type=int, default=128,
                   help="awq: input channels per INT4 group (32, 64, 128 or a multiple of 128; default 128)")
    p.add_argument("--symmetric", action="store_true",
                   help="awq: symmetric INT4 (zero point 8, no zero points stored); default: asymmetric")
    p.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                   help="round the weights with GPTQ's error compensation on calibration text, or with "
                        "--no-gptq to nearest; awq: static groups in act order (default: AwqSettings.gptq, "
                        "on); fp8: act order (default off)")
    p.add_argument("--format", dest="out_format", default="autoawq", choices=["autoawq", "compressed-tensors"],
                   help="awq: the output layout, AutoAWQ GEMM or compressed-tensors pack-quantized "
                        "(default autoawq); fp8 always writes compressed-tensors float-quantized")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gpu_engine.errors import TaxiwayError

    src, out = Path(args.model).expanduser(), Path(args.out).expanduser()
    try:
        if out.resolve() == src.resolve():
            raise ValueError("--out must differ from --model")
        if args.method == "awq":
            return _awq(args, src, out)
        quantize_fp8(src, out, static=args.static_activations, kv=args.kv_cache,
                     text_file=args.calibration_text, num_samples=args.num_samples, seq_len=args.seq_len,
                     device=args.device, gptq=bool(args.gptq))
    except (TaxiwayError, ValueError, OSError) as exc:
        print(f"taxiway quantize: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def quantize_fp8(src: Path, out: Path, *, static: bool, kv: bool, text_file: str | None = None,
                 num_samples: int = 64, seq_len: int = 512, device: str = "auto", gptq: bool = False) -> None:
    from gpu_engine.quant.calibrate import Hessians, calibration_samples, collect_amax, read_text
    from gpu_engine.quant.export import export_fp8
    from gpu_engine.quant.detect import read_checkpoint_quant

    if read_checkpoint_quant(src) is not None:
        raise ValueError(f"{src} is already quantized")
    amax, hessians = None, Hessians() if gptq else None
    if static or kv or gptq:
        from taxiway import LLM

        llm = LLM(str(src), device=device, enable_prefix_caching=False, max_model_len=seq_len + 1)
        if llm.get_tokenizer() is None:
            raise ValueError(f"{src} has no tokenizer.json to tokenize the calibration text with")
        samples = calibration_samples(llm.get_tokenizer(), read_text(text_file), num_samples, seq_len)
        amax = collect_amax(llm, samples, hessians=hessians)
        del llm
    export_fp8(src, out, amax, static=static, kv=kv, hessians=hessians)


def _awq(args: argparse.Namespace, src: Path, out: Path) -> int:
    from gpu_engine.quant.awq import quantize_awq
    from gpu_engine.quant.calibrate import read_text
    from gpu_engine.quant.detect import read_checkpoint_quant

    if read_checkpoint_quant(src) is not None:
        raise ValueError(f"{src} is already quantized")
    settings = {} if args.gptq is None else {"gptq": args.gptq}
    quantize_awq(src, out, group_size=args.group_size, zero_point=not args.symmetric,
                 calib_text=read_text(args.calibration_text), num_samples=args.num_samples,
                 seq_len=args.seq_len, out_format=args.out_format,
                 device=None if args.device == "auto" else args.device, **settings)
    print(f"wrote {out}")
    return 0
