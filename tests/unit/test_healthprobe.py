"""services.common.healthprobe against a real grpc.health.v1 server on loopback."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import healthprobe


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def test_serving_exits_zero(health_server, capsys):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthprobe.main([address]) == 0
    assert "SERVING" in capsys.readouterr().out


def test_not_serving_exits_one(health_server):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthprobe.check(address) == "NOT_SERVING"
    assert healthprobe.main([address]) == 1


def test_named_service(health_server):
    address, servicer = health_server
    servicer.set("taxiway.v1.Gateway", health_pb2.HealthCheckResponse.SERVING)
    assert healthprobe.main([address, "--service", "taxiway.v1.Gateway"]) == 0
    assert healthprobe.check(address, "unknown") == "UNREACHABLE: NOT_FOUND"


def test_unreachable_exits_one_quickly(unused_port):
    assert healthprobe.main([f"127.0.0.1:{unused_port}", "--timeout", "0.5"]) == 1


@pytest.mark.parametrize(
    ("env", "address"),
    [
        ({}, "127.0.0.1:50051"),
        ({"TAXIWAY_ROLE": "executor"}, "127.0.0.1:50054"),
        ({"TAXIWAY_ROLE": "tokenizer", "TAXIWAY_PORT": "6000"}, "127.0.0.1:6000"),
    ],
)
def test_default_address(env, address):
    assert healthprobe.default_address(env) == address


def test_unknown_role_is_rejected():
    with pytest.raises(ValueError, match="TAXIWAY_ROLE='bogus'"):
        healthprobe.default_address({"TAXIWAY_ROLE": "bogus"})


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
