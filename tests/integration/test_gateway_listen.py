"""When the gateway listens: at once without reuse_port (NOT_SERVING, calls UNAVAILABLE, as
Kubernetes probes expect), only once ready with it (gateway replicas share the ports, and a
starting one must not take connections another would serve); a port it cannot take once ready
ends the tier loudly."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.proto import Stub, pb
from services.common.redis_server import free_port
from services.gateway.config import GatewayConfig
from services.gateway.service import GatewayService
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.service import build as build_tokenizer
from tests.integration.svc_stack import INTERNAL_TOKEN, ROOT, Stack, child_env, wait_for

pytestmark = pytest.mark.timeout(120)


def gateway(redis_url: str, tokenizer_port: int, **options) -> GatewayService:
    return GatewayService(GatewayConfig(
        metrics_port=0, redis_url=redis_url, tokenizer_address=f"127.0.0.1:{tokenizer_port}",
        internal_token=INTERNAL_TOKEN, allow_anonymous=True, **options)).start()


def listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except ConnectionRefusedError:
        return False


def tokenizer(port: int):
    return build_tokenizer(TokenizerConfig(port=port, metrics_port=0, fake_engine=True,
                                           internal_token=INTERNAL_TOKEN))


def test_with_reuse_port_the_gateway_listens_only_once_ready(stack_factory, caplog):
    caplog.set_level(logging.INFO, logger="services.gateway.service")
    stack = stack_factory()  # a scheduler and an executor in the same Redis
    port, openai_port, tok_port = free_port(), free_port(), free_port()
    gw = gateway(stack.redis_url, tok_port, port=port, openai_port=openai_port, reuse_port=True)
    tok = None
    try:
        wait_for(lambda: "gateway not ready yet" in caplog.text, 10, "a readiness attempt")
        assert gw.server is None and not listens(port) and not listens(openai_port)
        tok = tokenizer(tok_port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            Stack.wait_serving(channel)
            req = pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(max_tokens=3))
            out = list(Stub(channel, "Gateway").Generate(req, timeout=30))
        assert out[-1].finish_reason == pb.FINISH_REASON_LENGTH
        models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{openai_port}/v1/models",
                                                   timeout=10).read())
        assert models["data"]
    finally:
        gw.stop()
        if tok is not None:
            tok.stop(0.5)


def test_without_reuse_port_the_gateway_listens_at_once_not_serving(redis_url):
    gw = gateway(redis_url, free_port(), port=0, openai_port=-1)  # no tokenizer there
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gw.server.port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                list(Stub(channel, "Gateway").Generate(pb.GenerateRequest(text="hi"), timeout=5))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "gateway is starting" in err.value.details()
    finally:
        gw.stop()


def test_a_reuse_port_gateway_drains_and_stops_before_ready(redis_url):
    port = free_port()
    gw = gateway(redis_url, free_port(), port=port, openai_port=-1, reuse_port=True)
    assert gw.drain(1.0)  # nothing to drain
    gw.stop()
    assert gw.server is None and not listens(port) and gw.failed is None


def test_a_port_taken_once_ready_fails_the_gateway(redis_url):
    """The OpenAI port is held by a socket without SO_REUSEPORT: the gRPC server was bound by then
    (and is stopped with the rest), the failure names the port."""
    tok = tokenizer(0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        openai_port = taken.getsockname()[1]
        gw = gateway(redis_url, tok.port, port=free_port(), openai_port=openai_port, reuse_port=True)
        try:
            failed = wait_for(lambda: gw.failed, 20, "the gateway to fail")
            assert f"127.0.0.1:{openai_port} (openai_port)" in str(failed)
            assert not gw.gate.is_open
        finally:
            gw.stop()
            tok.stop(0.5)


def test_any_error_on_the_way_to_ready_fails_the_gateway(redis_url, monkeypatch):
    """Not only a listen: the metrics failing once the model is known (or health) fails the
    gateway the same way, gate closed and `failed` set, rather than leaving it unready forever."""
    import services.gateway.service as gateway_service

    def broken(*args, **kwargs):
        raise ValueError("Duplicated timeseries in CollectorRegistry")

    monkeypatch.setattr(gateway_service, "GatewayMetrics", broken)
    tok = tokenizer(0)
    gw = gateway(redis_url, tok.port, port=0, openai_port=-1)
    try:
        failed = wait_for(lambda: gw.failed, 20, "the gateway to fail")
        assert isinstance(failed, ValueError) and "Duplicated timeseries" in str(failed)
        assert not gw.gate.is_open
        with grpc.insecure_channel(f"127.0.0.1:{gw.server.port}") as channel:
            with pytest.raises(grpc.RpcError) as err:
                list(Stub(channel, "Gateway").Generate(pb.GenerateRequest(text="hi"), timeout=5))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "gateway is failed" in err.value.details()
    finally:
        gw.stop()
        tok.stop(0.5)


def test_a_port_taken_once_ready_ends_the_tier_process(redis_url):
    """`taxiway serve --role gateway` exits 1 with one line naming the address."""
    tok = tokenizer(0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "services.serve", "--role", "gateway", "--reuse-port",
                 "--port", str(port), "--openai-port", "-1", "--metrics-port", "0",
                 "--redis-url", redis_url, "--tokenizer-address", f"127.0.0.1:{tok.port}",
                 "--allow-anonymous"],
                cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60, check=False)
        finally:
            tok.stop(0.5)
    assert proc.returncode == 1, proc.stderr
    assert f"taxiway serve --role gateway: cannot listen on 127.0.0.1:{port}" in proc.stderr
