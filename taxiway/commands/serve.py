"""`taxiway serve`: the gRPC services (services/serve.py does the work)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from services import serve

    p = subparsers.add_parser("serve", help="run the gRPC services (all four tiers by default)",
                              description=serve.DESCRIPTION)
    serve.add_arguments(p)
    p.set_defaults(func=serve.run)
