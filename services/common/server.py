"""A gRPC server as every tier runs it: the tier's services, grpc.health.v1 (NOT_SERVING until the
tier says it is ready), server reflection, and the one error interceptor."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.errors import ErrorInterceptor
from services.common.proto import add_service, service_full_name

log = logging.getLogger(__name__)

OPTIONS = [
    ("grpc.so_reuseport", 0),  # a taken port is an error, not a silently shared one
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


CHANNEL_OPTIONS = [
    # a tier that is still starting is retried within a second, not after gRPC's growing backoff
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def channel(address: str, extra: list[tuple[str, object]] | None = None) -> grpc.Channel:
    """A client channel to another tier."""
    return grpc.insecure_channel(address, options=[*CHANNEL_OPTIONS, *(extra or [])])


class GrpcServer:
    """Serves `services` ({"Gateway": impl, ...}) on host:port (port 0 picks a free one)."""

    def __init__(self, host: str, port: int, services: dict[str, object], *, max_workers: int):
        self._server = grpc.server(ThreadPoolExecutor(max_workers=max_workers),
                                   interceptors=[ErrorInterceptor()], options=OPTIONS)
        for name, impl in services.items():
            add_service(self._server, name, impl)
        self._health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._names = ["", *(service_full_name(n) for n in services)]
        reflection.enable_server_reflection(
            [*self._names[1:], health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port} (in use?)")
        self.host = host
        self.set_serving(False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> GrpcServer:
        self._server.start()
        return self

    def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self._names:
            self._health.set(name, status)

    def stop(self, grace: float | None = 2.0) -> None:
        self.set_serving(False)
        self._server.stop(grace).wait()

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)
