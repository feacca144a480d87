"""A tiny grpc.health.v1 client for container health checks (Docker HEALTHCHECK, compose).

    python -m services.common.healthprobe [ADDRESS] [--service NAME] [--timeout SECONDS]

Exit status 0 when the server answers SERVING, 1 otherwise (NOT_SERVING, unknown service,
unreachable, timeout); Docker reserves 2. Without ADDRESS it probes 127.0.0.1 on $TAXIWAY_PORT,
or on the default port of $TAXIWAY_ROLE (gateway 50051, tokenizer 50052, scheduler 50053,
executor 50054; "all" probes the gateway). Kubernetes needs none of this: its `grpc:` probe
speaks the same protocol.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_PORTS = {"gateway": 50051, "tokenizer": 50052, "scheduler": 50053, "executor": 50054, "all": 50051}


def default_address(environ: dict[str, str] | None = None) -> str:
    """127.0.0.1:<port> from TAXIWAY_PORT, else from TAXIWAY_ROLE's default port."""
    env = os.environ if environ is None else environ
    port = env.get("TAXIWAY_PORT") or DEFAULT_PORTS.get(env.get("TAXIWAY_ROLE", "all"))
    if port is None:
        raise ValueError(
            f"TAXIWAY_ROLE={env.get('TAXIWAY_ROLE')!r} is not one of {sorted(DEFAULT_PORTS)}; "
            "pass the address explicitly"
        )
    return f"127.0.0.1:{port}"


def check(address: str, service: str = "", timeout: float = 3.0) -> str:
    """Ask `address` for the health of `service` ("" = the whole server).

    Returns the status name ("SERVING", "NOT_SERVING", ...), or "UNREACHABLE: <gRPC code>"
    when the call fails (connection refused, deadline, unknown service).
    """
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            return f"UNREACHABLE: {err.code().name}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.healthprobe",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("address", nargs="?", help="host:port (default: from TAXIWAY_PORT / TAXIWAY_ROLE)")
    parser.add_argument("--service", default="", help='health service name (default "": the whole server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    try:
        address = args.address or default_address()
    except ValueError as err:
        print(err, file=sys.stderr)
        return 1
    status = check(address, args.service, args.timeout)
    print(f"{address} {args.service or '<server>'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
