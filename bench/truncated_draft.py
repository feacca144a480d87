"""A draft model for speculative decoding (method draft_model): the target's first L decoder layers
with its embeddings, final norm and lm_head, so it shares the target's tokenizer and vocabulary.

    python bench/truncated_draft.py --layers 6 --out /tmp/draft-smollm2-L6   # from the default model

The output is an ordinary Hugging Face Llama folder (config.json with num_hidden_layers = L,
model.safetensors, the tokenizer files), loadable as `{"method": "draft_model", "model": OUT}`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "tokenizer.model")


def truncate(target: Path, out: Path, layers: int) -> dict:
    """Write the first `layers` layers of `target` to `out`; returns the draft's config."""
    config = json.loads((target / "config.json").read_text())
    total = int(config["num_hidden_layers"])
    if not 1 <= layers < total:
        raise SystemExit(f"--layers must be between 1 and {total - 1} (the target has {total}), got {layers}")
    files = sorted(target.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{target} holds no *.safetensors file")
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                m = _LAYER.match(name)
                if m is None or int(m.group(1)) < layers:
                    tensors[name] = sf.get_tensor(name)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {**config, "num_hidden_layers": layers}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in _COPIED:
        if (target / name).exists():
            shutil.copy(target / name, out / name)
    return config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None, help="target folder (default: the default model)")
    ap.add_argument("--layers", type=int, default=6, help="decoder layers to keep")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.target is None:
        from gpu_engine.default_model import default_model_path

        target = Path(default_model_path())
    else:
        target = Path(args.target)
    cfg = truncate(target, Path(args.out), args.layers)
    print(f"wrote {args.out}: {cfg['num_hidden_layers']} layers of {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
