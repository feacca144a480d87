"""`taxiway train-draft --target DIR --out DIR`: train an EAGLE-3 head for a model by
self-distillation (gpu_engine/spec/train.py); flags are TrainDraftConfig's fields."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import MISSING, fields


def add_parser(sub: argparse._SubParsersAction) -> None:
    from gpu_engine.spec.train_config import TrainDraftConfig

    p = sub.add_parser(
        "train-draft", help="train an EAGLE-3 draft head for a model (self-distillation)",
        description="Train an EAGLE-3 head: the target answers prompts, the head learns its hidden "
                    "states' next tokens with the training-time test; writes the published EAGLE-3 "
                    "layout and OUT/train_report.json (held-out acceptance length).")
    hints = typing.get_type_hints(TrainDraftConfig)
    for f in fields(TrainDraftConfig):
        tp = _base(hints[f.name])
        kwargs = {"default": f.default if f.default is not MISSING else None, "dest": f.name,
                  "help": f"{f.metadata.get('help', '')} (default: {f.default})".replace('%', '%%')}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=tp, metavar=f.name.upper())
        p.add_argument(f"--{f.name.replace('_', '-')}", **kwargs)
    p.set_defaults(func=run)


def _base(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def run(args: argparse.Namespace) -> int:
    from gpu_engine.errors import TaxiwayError
    from gpu_engine.spec.train import train_draft
    from gpu_engine.spec.train_config import TrainDraftConfig

    try:
        cfg = TrainDraftConfig(**{f.name: getattr(args, f.name) for f in fields(TrainDraftConfig)})
        report = train_draft(cfg)
    except (TaxiwayError, ValueError, OSError) as exc:
        print(f"taxiway train-draft: {exc}", file=sys.stderr)
        return 1
    acc = report["heldout_acceptance"]
    print(json.dumps({"out": cfg.out, "heldout_mean_acceptance_length": acc["mean_acceptance_length"],
                      "k": acc["k"], "train_examples": report["num_train_examples"],
                      "seconds": {k: round(v, 1) for k, v in report["seconds"].items()}}))
    return 0
