"""The gateway tier's shell: the public taxiway.v1.Gateway API (grpc.aio) and the OpenAI-compatible
HTTP API (Starlette on uvicorn) over one GatewayCore, all on one asyncio event loop in a thread of
its own, so that one replica holds thousands of streams without a thread each. start(), drain()
and stop() are called from the owner's thread (`taxiway serve --role gateway`, the tests)."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid

from opentelemetry import trace

from services.common import streams
from services.common.aio import LoopThread
from services.common.auth import KeyRing
from services.common.drain import AioGatedServicer, Gate
from services.common.metrics import GatewayMetrics
from services.common.observe import TierObservability, model_label
from services.common.server import AioGrpcServer, ServerSecurity
from services.gateway.clients import GrpcTokenizerClient, OutputReader, RedisIntake
from services.gateway.config import GatewayConfig
from services.gateway.core import GatewayCore
from services.gateway.grpc_api import GatewayServicer

log = logging.getLogger(__name__)
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 2.0


class GatewayService:
    """start(): listens at once (NOT_SERVING, calls UNAVAILABLE), SERVING once Redis answers and
    the tokenizer tier describes the model; with reuse_port it listens only then, so that the
    kernel never hands a connection to a replica still starting while another serves. drain():
    NOT_SERVING, new calls UNAVAILABLE, the streams in flight run to their end. stop(): the
    requests still in flight end as cancelled."""

    def __init__(self, config: GatewayConfig, *, tracer_provider: trace.TracerProvider | None = None):
        self.config = config
        self.gateway_id = config.gateway_id or uuid.uuid4().hex[:12]
        self._provider = tracer_provider
        self._stopping = threading.Event()
        self.gate = Gate("gateway")
        self.server: AioGrpcServer | None = None
        """The gRPC server; None until it listens (with reuse_port: until ready)."""
        self.http = None
        """The OpenAI-compatible HTTP server (services/gateway/openai), unless openai_port is -1."""
        self.failed: Exception | None = None
        """Why the gateway cannot go on (it could not listen once ready): run_role ends it."""

    def start(self) -> GatewayService:
        cfg = self.config
        if not cfg.redis_url:
            raise ValueError("the gateway needs --redis-url (or REDIS_URL)")
        security = self._security()
        credential = cfg.internal_credential()
        self.obs = TierObservability("gateway", host=cfg.host, metrics_port=cfg.metrics_port,
                                     tracer_provider=self._provider)
        self.loop = LoopThread("gateway")
        try:
            self.loop.run(self._astart(security, credential), START_TIMEOUT_S)
        except BaseException:
            self.loop.stop()
            self.obs.close()
            raise
        return self

    async def _astart(self, security: ServerSecurity, credential: str | None) -> None:
        cfg = self.config
        self.redis = streams.connect_async(cfg.redis_url, **cfg.redis_options())
        self.tokenizer = GrpcTokenizerClient(cfg.tokenizer_address, credential=credential,
                                             ca_file=cfg.internal_tls_ca_file)
        self.core = GatewayCore(self.gateway_id, self.tokenizer, RedisIntake(self.redis),
                                request_timeout_s=cfg.request_timeout_s,
                                max_concurrent_requests=cfg.max_concurrent_requests,
                                tracer=self.obs.tracer)
        if not cfg.reuse_port:
            await self._listen(security)  # at once, NOT_SERVING until ready (what probes expect)
        self.reader = await OutputReader(
            streams.connect_async(cfg.redis_url, **cfg.redis_options()), self.gateway_id,
            self.core.router, on_restart=self.core.redis_restarted, on_outage=self.core.redis_lost,
            on_health=self._redis_health, outage_s=cfg.redis_outage_s).start()
        self._ready = asyncio.create_task(self._become_ready(security), name="readiness")

    async def _listen(self, security: ServerSecurity) -> None:
        """Builds and starts the gRPC server and (unless openai_port is -1) the OpenAI HTTP
        server; an OSError naming the address when a port is taken."""
        cfg = self.config
        servicer = AioGatedServicer(self.gate, target=GatewayServicer(self.core))
        self.server = AioGrpcServer(cfg.host, cfg.port, {"Gateway": servicer}, security=security,
                                    max_receive_bytes=4 * cfg.max_request_bytes,
                                    request_limit=cfg.max_request_bytes, reuse_port=cfg.reuse_port)
        if cfg.openai_port != -1:
            from services.gateway.openai.server import OpenAIServer

            self.http = await OpenAIServer(self.core, self.gate, security.keys, cfg).start()
        await self.server.start()

    def _security(self) -> ServerSecurity:
        cfg = self.config
        keys = KeyRing.from_sources(cfg.api_keys, cfg.api_keys_file)
        if keys is None and not cfg.allow_anonymous:
            raise ValueError("the gateway needs API keys (api_keys / TAXIWAY_API_KEYS, or "
                             "api_keys_file), or allow_anonymous to serve without them")
        if keys is None:
            log.warning("the gateway serves without API keys (allow_anonymous)")
        return ServerSecurity(keys, cfg.tls_cert_file, cfg.tls_key_file, cfg.reflection)

    async def _redis_health(self, ok: bool) -> None:
        """Redis lost or back: health follows (new calls would fail meanwhile anyway)."""
        if self.gate.is_open and self.server is not None:
            await self.server.set_serving(ok)

    async def _become_ready(self, security: ServerSecurity) -> None:
        """SERVING once Redis answers and the tokenizer tier describes the model. Anything else
        that goes wrong on the way (the listen, the metrics, health) fails the gateway: the gate
        closes and `failed` says why, so the tier exits rather than waiting, unready, forever."""
        try:
            await self._wait_ready(security)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any of it (a port taken, TLS files, the metrics)
            self.gate.close("failed")
            log.error("gateway %s cannot serve: %s: %s", self.gateway_id, type(exc).__name__, exc)
            self.failed = exc

    async def _wait_ready(self, security: ServerSecurity) -> None:
        while not self._stopping.is_set():
            try:
                await self.redis.ping()
                info = await self.tokenizer.model_info()
            except Exception as exc:  # noqa: BLE001 - not yet: try again
                log.info("gateway not ready yet: %s", exc)
                await asyncio.sleep(0.5)
                continue
            self.core.metrics = GatewayMetrics(model_label(info.name), registry=self.obs.registry)
            self.gate.open()  # before a reuse_port listen: whoever connects then is served
            if self.server is None:
                await self._listen(security)
            await self.server.set_serving(True)
            log.info("gateway %s serving %s on %s%s", self.gateway_id, info.name,
                     self.server.address, f" (OpenAI API on {self.http.url})" if self.http else "")
            return

    def drain(self, timeout_s: float, interrupted: threading.Event | None = None) -> bool:
        """True when every request in flight ended within timeout_s."""
        self._stopping.set()
        self.loop.run(self._close("draining"))
        return self.gate.wait_idle(timeout_s, interrupted)

    async def _close(self, state: str) -> None:
        """Readiness given up (it would open the gate again), then the gate closed (new calls
        UNAVAILABLE, "gateway is <state>"), then health NOT_SERVING where it listens."""
        self._ready.cancel()
        await asyncio.gather(self._ready, return_exceptions=True)
        self.gate.close(state)  # first: nobody gets in once health says NOT_SERVING
        if self.server is not None:
            await self.server.set_serving(False)

    def stop(self) -> None:
        if not self.loop.alive:
            return  # stopped already
        self._stopping.set()
        try:
            self.loop.run(self._astop(), STOP_GRACE_S + 10)
        finally:
            self.loop.stop()
            self.obs.close()

    async def _astop(self) -> None:
        await self._close("stopped")
        ended = self.core.shutdown()  # each ends with FINISH_REASON_CANCELLED, aborted upstream
        if ended:
            log.info("gateway stopping: %d requests in flight end as cancelled", ended)
        await asyncio.sleep(0)  # let them send their last chunk before the servers stop
        await asyncio.gather(*([self.server.stop(STOP_GRACE_S)] if self.server is not None else []),
                             *([self.http.stop()] if self.http is not None else []))
        await self.reader.stop()
        await self.tokenizer.close()
        await self.redis.aclose()
