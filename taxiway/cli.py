"""The `taxiway` command line. Each subcommand lives in taxiway/commands/<name>.py and exposes
`add_parser(subparsers)` (which sets `func` on its parser) ; this module only wires them together."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `taxiway --help` lists them.
COMMANDS = ("generate", "bench", "quantize", "serve", "client", "train_draft")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taxiway",
        description="Serve large language models: in-flight batching, paged KV cache, gRPC services.",
    )
    from taxiway import __version__

    parser.add_argument("--version", action="version", version=f"taxiway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"taxiway.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
