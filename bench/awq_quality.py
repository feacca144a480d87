"""Quality of INT4 AWQ on the default model (SmolLM2-135M-Instruct): perplexity, unquantized vs
taxiway's AWQ rounding to nearest and with GPTQ (and round-to-nearest INT4 without AWQ, to show
what the search buys), all in one run, on text no
calibration or test tunes on (gpu_engine.quant.calib_text.evaluation_text: the odd-numbered topics
of CPython's Language Reference; AWQ calibrates on the even-numbered ones), and on a second text
of another kind (bench/data/quality_eval.txt, bench/quality.py's), which shows what fits the
calibration text's domain rather than the model. A third, validation, text is the calibration
source's tail that no calibration reads (VALIDATION_START): settings are chosen on it, so the two
evaluation texts stay untuned.

Perplexity runs our CausalLM's parameters through the CPU references on whole windows
(gpu_engine.quant.awq_forward.dense_logits), with each checkpoint's weights dequantized
(gpu_engine.quant.int4_checkpoint.load_dequantized), until the quantization framework lets the
engine load INT4 checkpoints itself. Writes a JSON result when --out is given.

    python bench/awq_quality.py --out bench/results/awq-quality-cpu.json

--gptq actorder actorder_damp001 static dynamic compares GPTQ's ways of choosing group scales,
column order and dampening (actorder alone: the default settings); --n-grid and --num-samples
make a cheaper calibration for such comparisons.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gpu_engine.config import ModelConfig  # noqa: E402
from gpu_engine.default_model import default_model_path  # noqa: E402
from gpu_engine.quant.awq import AwqSettings, quantize_awq  # noqa: E402
from gpu_engine.quant.awq_forward import dense_logits  # noqa: E402
from gpu_engine.quant.calib_text import calibration_text, evaluation_text, token_windows  # noqa: E402
from gpu_engine.quant.int4 import fake_quantize_int4  # noqa: E402
from gpu_engine.quant.int4_checkpoint import load_dequantized  # noqa: E402
from gpu_engine.tokenizer import Tokenizer  # noqa: E402
from gpu_engine.weights import build_model, load_checkpoint  # noqa: E402


OTHER_TEXT = ROOT / "bench" / "data" / "quality_eval.txt"
OTHER_SEQ_LEN = 256  # the text has about 1.7k tokens
VALIDATION_START = 40_000
"""The validation text: the calibration source's tokens from here on, which no calibration reads
(`taxiway quantize` takes its first 64 x 512 = 32,768, this bench its first 32 x 256). Settings are
chosen on it, never on the evaluation texts."""
GPTQ_VARIANTS = {  # AwqSettings of each --gptq variant
    "static": dict(gptq_static_groups=True, gptq_act_order=False),
    "dynamic": dict(gptq_static_groups=False, gptq_act_order=False),
    "actorder": dict(gptq_static_groups=True, gptq_act_order=True),
    "actorder_damp001": dict(gptq_static_groups=True, gptq_act_order=True, gptq_damp=0.01),
}


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over windows ids [W, S] (each scored alone)."""
    nll, count = 0.0, 0
    for i in range(0, ids.shape[0], batch):
        chunk = ids[i:i + batch]
        logits = dense_logits(model, chunk)[:, :-1]
        nll += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"))
        count += chunk[:, 1:].numel()
    return math.exp(nll / count)


def _float_model(path):
    cfg = ModelConfig.from_folder(path)
    model = build_model(cfg, torch.float32, torch.device("cpu"))
    load_checkpoint(model, path, cfg, progress=False)
    return model


def _rtn_model(path, group_size: int, zero_point: bool):
    model = _float_model(path)
    for layer in model.layers:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            lin = getattr(layer, name)
            lin.weight.data = fake_quantize_int4(lin.weight.data, group_size, zero_point)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description="perplexity of the default model: float vs INT4 AWQ")
    parser.add_argument("--group-size", type=int, default=64, help="128 does not divide SmolLM2's 576")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--format", default="autoawq", choices=("autoawq", "compressed-tensors"))
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--gptq", nargs="+", default=["actorder"], choices=tuple(GPTQ_VARIANTS),
                        help="AWQ+GPTQ variants: group scales from the clipped weights (static, and in act "
                             "order: actorder, with GPTQ's usual 1%% dampening: actorder_damp001), or as "
                             "GPTQ reaches each group (dynamic)")
    parser.add_argument("--n-grid", type=int, default=AwqSettings.n_grid, help="AWQ's scale and clip grids")
    parser.add_argument("--num-samples", type=int, default=AwqSettings.num_samples, help="calibration windows")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    from taxiway.benchmarks import commit_id

    commit = commit_id()
    path = default_model_path()
    tok = Tokenizer.from_folder(path)
    ids = token_windows(tok.encode(evaluation_text(), add_special_tokens=False), args.windows, args.seq_len)
    other = tok.encode(OTHER_TEXT.read_text(), add_special_tokens=False)
    other_ids = token_windows(other, len(other) // OTHER_SEQ_LEN, OTHER_SEQ_LEN)
    val = tok.encode(calibration_text(), add_special_tokens=False)[VALIDATION_START:]
    val_ids = token_windows(val, args.windows, args.seq_len)
    zero_point = not args.symmetric
    res, res_other, res_val = {}, {}, {}

    def score(name: str, model) -> None:
        res[name], res_other[name] = perplexity(model, ids), perplexity(model, other_ids)
        res_val[name] = perplexity(model, val_ids)
        print(f"{name:24} perplexity {res[name]:8.3f}  ({100 * (res[name] / res['float32'] - 1):+.2f}%), "
              f"other text {res_other[name]:8.3f}  ({100 * (res_other[name] / res_other['float32'] - 1):+.2f}%), "
              f"validation {res_val[name]:8.3f}  ({100 * (res_val[name] / res_val['float32'] - 1):+.2f}%)",
              flush=True)

    score("float32", _float_model(path))
    score("int4_rtn", _rtn_model(path, args.group_size, zero_point))
    variants = {"int4_awq": dict(gptq=False)}
    variants.update({f"int4_awq_gptq_{v}": dict(gptq=True, **GPTQ_VARIANTS[v]) for v in args.gptq})
    calib_s = {}
    for name, settings in variants.items():
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            quantize_awq(path, tmp, group_size=args.group_size, zero_point=zero_point, out_format=args.format,
                         num_samples=args.num_samples, n_grid=args.n_grid, device="cpu", progress=False,
                         **settings)
            calib_s[name] = time.perf_counter() - t0
            score(name, load_dequantized(tmp)[0])
        print(f"  calibration {calib_s[name]:.0f} s", flush=True)
    if args.out:
        meta = dict(device=f"CPU ({platform.processor() or 'cpu'}), {torch.get_num_threads()} threads",
                    commit=commit, command=" ".join(sys.argv), model=str(path), torch=torch.__version__,
                    text="calib_text.evaluation_text()", tokens=ids.numel(),
                    other_text=str(OTHER_TEXT.relative_to(ROOT)), other_tokens=other_ids.numel(),
                    validation_text=f"calib_text.calibration_text() from token {VALIDATION_START}",
                    validation_tokens=val_ids.numel(), **vars(args))
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, perplexity=res, relative=_relative(res), calibration_s=calib_s,
                           other_text=dict(perplexity=res_other, relative=_relative(res_other)),
                           validation=dict(perplexity=res_val, relative=_relative(res_val))), f, indent=1)


def _relative(ppl: dict[str, float]) -> dict[str, float]:
    return {k: v / ppl["float32"] - 1 for k, v in ppl.items()}


if __name__ == "__main__":
    main()
