"""A gRPC server as every tier runs it: the tier's services, grpc.health.v1 (NOT_SERVING until the
tier says it is ready), server reflection (unless turned off), TLS when given a certificate, the
one error interceptor, and authentication (services/common/auth.py): API keys on the gateway,
the internal credential on the other tiers. Health and reflection need no credential."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import AioAuthInterceptor, AuthInterceptor, KeyRing, with_credential
from services.common.errors import AioErrorInterceptor, ErrorInterceptor
from services.common.proto import add_service, service_full_name

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Between tiers, and the default cap of a server's incoming messages."""
OPTIONS = [
    ("grpc.so_reuseport", 0),  # a taken port is an error, not a silently shared one
]


AIO_OPTIONS = [
    # C-core holds calls that arrived and are not yet handed to the application as "pending";
    # past its default (1,000 soft, 3,000 hard) a grpc.aio server stops taking new streams while
    # thousands are open (measured: stuck at ~2,300 of 3,000 open bidi streams).
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
]


CHANNEL_OPTIONS = [
    # a tier that is still starting is retried within a second, not after gRPC's growing backoff
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def aio_channel(address: str, extra: list[tuple[str, object]] | None = None, *,
                ca_file: str | None = None) -> grpc.aio.Channel:
    """A grpc.aio client channel to another tier (TLS when `ca_file` is given); the caller adds
    the internal credential to each call's metadata."""
    options = [*CHANNEL_OPTIONS, *(extra or [])]
    if ca_file:
        creds = grpc.ssl_channel_credentials(root_certificates=_read(ca_file, "CA file"))
        return grpc.aio.secure_channel(address, creds, options=options)
    return grpc.aio.insecure_channel(address, options=options)


def channel(address: str, extra: list[tuple[str, object]] | None = None, *,
            credential: str | None = None, ca_file: str | None = None) -> grpc.Channel:
    """A client channel to another tier: TLS when `ca_file` (PEM) is given, the internal
    credential on every call when `credential` is."""
    options = [*CHANNEL_OPTIONS, *(extra or [])]
    if ca_file:
        creds = grpc.ssl_channel_credentials(root_certificates=_read(ca_file, "CA file"))
        raw = grpc.secure_channel(address, creds, options=options)
    else:
        raw = grpc.insecure_channel(address, options=options)
    return with_credential(raw, credential)


@dataclass(frozen=True)
class ServerSecurity:
    """Who may call a server and over what: keys (None: anyone; the peer address names the
    caller), TLS certificate and key files (None: plaintext), server reflection."""

    keys: KeyRing | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    reflection: bool = True

    @classmethod
    def internal(cls, cfg) -> ServerSecurity:
        """For an internal tier: its SecurityOptions (the internal credential is its key)."""
        token = cfg.internal_credential()
        keys = KeyRing([("internal", token)]) if token else None
        if keys is None:
            log.warning("internal RPCs of this tier accept any caller (insecure_internal)")
        return cls(keys, cfg.tls_cert_file, cfg.tls_key_file, cfg.reflection)


def _add_services(server, services: dict[str, object], health_servicer, sec: ServerSecurity,
                  request_limit: int | None, aio: bool) -> list[str]:
    """The services, the health service and (if on) reflection on `server`; returns the names
    health reports for ("" is the whole server)."""
    for name, impl in services.items():
        add_service(server, name, impl, request_limit=request_limit, aio=aio)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = ["", *(service_full_name(n) for n in services)]
    if sec.reflection:
        reflection.enable_server_reflection(
            [*names[1:], health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], server)
    return names


class GrpcServer:
    """Serves `services` ({"Gateway": impl, ...}) on host:port (port 0 picks a free one).
    `max_receive_bytes` caps incoming messages (gRPC refuses larger ones itself)."""

    def __init__(self, host: str, port: int, services: dict[str, object], *, max_workers: int,
                 security: ServerSecurity | None = None,
                 max_receive_bytes: int = MAX_MESSAGE_BYTES, request_limit: int | None = None):
        sec = security or ServerSecurity()
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=max_workers),
            interceptors=[ErrorInterceptor(), AuthInterceptor(sec.keys)],
            options=[*OPTIONS, ("grpc.max_receive_message_length", max_receive_bytes)])
        self._health = health.HealthServicer(experimental_non_blocking=True)
        self._names = _add_services(self._server, services, self._health, sec, request_limit, aio=False)
        self.port = _bind(self._server, host, port, sec)
        self.host = host
        self.tls = bool(sec.tls_cert_file)
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


class AioGrpcServer:
    """GrpcServer on grpc.aio, for tiers that hold thousands of streams (no thread per call):
    the same health, reflection, TLS, error and authentication interceptors. Build it and call
    its coroutines on the event loop that serves it; services' methods are coroutines and async
    generators (add_service(..., aio=True))."""

    def __init__(self, host: str, port: int, services: dict[str, object], *,
                 security: ServerSecurity | None = None,
                 max_receive_bytes: int = MAX_MESSAGE_BYTES, request_limit: int | None = None,
                 reuse_port: bool = False):
        """reuse_port: share the port with other processes that listen with it (gateway replicas)."""
        sec = security or ServerSecurity()
        options = [("grpc.so_reuseport", 1)] if reuse_port else OPTIONS
        self._server = grpc.aio.server(
            interceptors=[AioErrorInterceptor(), AioAuthInterceptor(sec.keys)],
            options=[*options, *AIO_OPTIONS,
                     ("grpc.max_receive_message_length", max_receive_bytes)])
        self._health = health.aio.HealthServicer()
        self._names = _add_services(self._server, services, self._health, sec, request_limit, aio=True)
        self.port = _bind(self._server, host, port, sec)
        self.host = host
        self.tls = bool(sec.tls_cert_file)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> AioGrpcServer:
        await self.set_serving(False)
        await self._server.start()
        return self

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self._names:
            await self._health.set(name, status)

    async def stop(self, grace: float | None = 2.0) -> None:
        await self.set_serving(False)
        await self._server.stop(grace)


def _bind(server, host: str, port: int, sec: ServerSecurity) -> int:
    """Listens on host:port; raises OSError naming the address when it cannot (in use)."""
    address = f"{host}:{port}"
    try:
        if sec.tls_cert_file:
            creds = grpc.ssl_server_credentials([(_read(sec.tls_key_file, "TLS key"),
                                                  _read(sec.tls_cert_file, "TLS certificate"))])
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {address}: the port is in use (or the address is not "
                      "this machine's)")
    return bound


def _read(path: str | None, what: str) -> bytes:
    try:
        return Path(path or "").read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc}") from None
