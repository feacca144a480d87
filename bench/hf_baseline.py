"""HF transformers baseline for the throughput benchmark: `generate_batch` (its own continuous
batching with paged attention) on the same architecture with random weights, under torch.no_grad().

    python bench/hf_baseline.py --preset llama-3.1-8b --isl 128 --osl 128 --num-requests 512 --out x.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_engine.config import PRESETS  # noqa: E402
from taxiway.benchmarks import machine_info, random_prompts  # noqa: E402


def build_model(preset_or_folder: str, dtype: torch.dtype, device: str):
    import transformers

    if preset_or_folder in PRESETS:
        cfg = transformers.LlamaConfig(**{k: v for k, v in PRESETS[preset_or_folder].items()
                                          if k not in ("architectures", "torch_dtype")})
    else:
        cfg = transformers.AutoConfig.from_pretrained(preset_or_folder)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=128)
    ap.add_argument("--num-requests", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import transformers
    from transformers.generation import GenerationConfig

    model = build_model(args.preset, getattr(torch, args.dtype), args.device)
    vocab = model.config.vocab_size
    gen_cfg = GenerationConfig(max_new_tokens=args.osl, min_new_tokens=args.osl, do_sample=False,
                               eos_token_id=vocab - 1, pad_token_id=0)
    with torch.no_grad():
        model.generate_batch(inputs=random_prompts(8, args.isl, vocab, 1), generation_config=gen_cfg,
                             progress_bar=False)  # warm-up
        prompts = random_prompts(args.num_requests, args.isl, vocab, 0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = model.generate_batch(inputs=prompts, generation_config=gen_cfg, progress_bar=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    generated = sum(len(r.generated_tokens) for r in results.values())
    result = {
        "benchmark": "hf_generate_batch", "transformers": transformers.__version__,
        "config": vars(args), "machine": machine_info(), "elapsed_s": round(elapsed, 3),
        "generated_tokens": generated, "output_tokens_per_s": round(generated / elapsed, 1),
        "total_tokens_per_s": round((generated + args.num_requests * args.isl) / elapsed, 1),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
