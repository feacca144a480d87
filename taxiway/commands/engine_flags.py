"""Command-line flags for every engine setting, made from EngineConfig's fields (their help texts
and types), so a setting is declared once for `LLM(...)`, `taxiway serve` and `taxiway bench`."""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import fields
from typing import Any

from gpu_engine.config import EngineConfig


def add_engine_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None,
                         title: str = "engine settings (gpu_engine.config.EngineConfig)",
                         default_help: dict[str, str] | None = None, only_given: bool = False) -> None:
    """One flag per EngineConfig field. A flag left out keeps `defaults[name]` if given, else the
    engine's own default; with only_given, a flag left out is absent from the parsed namespace
    (see engine_overrides), and `default_help[name]` says what stands in for it."""
    defaults, default_help = defaults or {}, default_help or {}
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(EngineConfig)
    for f in fields(EngineConfig):
        default = defaults.get(f.name, f.default)
        shown = default_help.get(f.name, default)
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS if only_given else default,
                                  "dest": f"engine_{f.name}",
                                  "help": f"{f.metadata.get('help', '')} (default: {shown})"}
        tp = _base(hints[f.name])
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif tp is dict:
            kwargs.update(type=json.loads, metavar="JSON")
        else:
            kwargs.update(type=tp, metavar=f.name.upper())
        group.add_argument(f"--{f.name.replace('_', '-')}", **kwargs)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig keyword arguments the parsed flags hold."""
    return {f.name: getattr(args, f"engine_{f.name}") for f in fields(EngineConfig)}


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings given on the command line (flags added with only_given)."""
    return {f.name: getattr(args, f"engine_{f.name}") for f in fields(EngineConfig)
            if hasattr(args, f"engine_{f.name}")}


def _base(tp: Any) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is dict:
        return dict
    return _base(args[0]) if args else tp
