"""The gateway tier's shell: the public taxiway.v1.Gateway API over GatewayCore."""

from __future__ import annotations

import logging
import threading
import uuid

from opentelemetry import context as otel_context
from opentelemetry import trace

from gpu_engine import limits
from gpu_engine.errors import InvalidRequest
from services.common import convert, streams
from services.common.auth import KeyRing, current_caller
from services.common.drain import Gate, GatedServicer
from services.common.metrics import GatewayMetrics
from services.common.observe import TierObservability, model_label
from services.common.proto import pb
from services.common.server import GrpcServer, ServerSecurity
from services.common.telemetry import extract_context
from services.gateway.clients import GrpcTokenizerClient, OutputReader, RedisIntake
from services.gateway.config import GatewayConfig
from services.gateway.core import Chunk, GatewayCore, GenerateInput

log = logging.getLogger(__name__)


class GatewayServicer:
    def __init__(self, core: GatewayCore):
        self.core = core

    def Generate(self, request, context):
        for chunk in self._generate(request, context):
            yield chunk_to_pb(chunk)

    def GenerateOnce(self, request, context):
        chunks = list(self._generate(request, context))
        return chunk_to_pb(merge_chunks(chunks, chunks[-1].request_id if chunks else ""))

    def _generate(self, request, context):
        return self.core.generate(generate_input_from_pb(request), caller=current_caller(),
                                  timeout_s=context.time_remaining(),
                                  parent=extract_context(context.invocation_metadata()),
                                  on_cancel=context.add_callback)

    def Tokenize(self, request, context):
        token = otel_context.attach(extract_context(context.invocation_metadata()))
        try:  # the client's trace context goes on to the tokenizer tier
            ids, text = self.core.tokenizer.tokenize(**convert.tokenize_request_from_pb(request))
        finally:
            otel_context.detach(token)
        return pb.TokenizeResponse(token_ids=ids, text=text)

    def GetModelInfo(self, request, context):
        return convert.model_info_to_pb(self.core.tokenizer.model_info())


def generate_input_from_pb(msg) -> GenerateInput:
    if len(msg.request_id) > limits.MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request_id may have at most {limits.MAX_REQUEST_ID_CHARS} "
                             f"characters, got {len(msg.request_id)}")
    kind = msg.WhichOneof("prompt")
    params = convert.sampling_from_pb(msg.sampling)
    fields = {"request_id": msg.request_id, "priority": msg.priority,
              "params": params}
    if kind == "text":
        return GenerateInput(text=msg.text, **fields)
    if kind == "token_ids":
        return GenerateInput(token_ids=tuple(msg.token_ids.ids), **fields)
    if kind == "messages":
        return GenerateInput(messages=[{"role": m.role, "content": m.content}
                                       for m in msg.messages.messages], **fields)
    raise InvalidRequest("no prompt: set text, token_ids or messages")


def chunk_to_pb(chunk: Chunk):
    msg = pb.GenerateResponse(request_id=chunk.request_id, token_ids=chunk.token_ids,
                              text=chunk.text, stop_reason=chunk.stop_reason)
    if chunk.finish_reason:
        msg.finish_reason = pb.FinishReason.Value(convert.FINISH_REASONS[chunk.finish_reason])
    if chunk.usage:
        msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_tokens = chunk.usage
    for lp, token in zip(chunk.logprobs or (), chunk.token_ids):
        entry = msg.logprobs.add(token_id=token, logprob=lp.get(token, 0.0))
        entry.top_logprobs.update(lp)
    return msg


def merge_chunks(chunks: list[Chunk], request_id: str) -> Chunk:
    merged = Chunk(request_id)
    for c in chunks:
        merged.token_ids += c.token_ids
        merged.text += c.text
        if c.logprobs:
            merged.logprobs = (merged.logprobs or []) + c.logprobs
        merged.finish_reason = c.finish_reason or merged.finish_reason
        merged.stop_reason = c.stop_reason or merged.stop_reason
        merged.usage = c.usage or merged.usage
    return merged


class GatewayService:
    """start(): listens at once (NOT_SERVING, calls UNAVAILABLE), SERVING once Redis answers and
    the tokenizer tier describes the model. drain(): NOT_SERVING, new calls UNAVAILABLE, the
    streams in flight run to their end."""

    def __init__(self, config: GatewayConfig, *, tracer_provider: trace.TracerProvider | None = None):
        self.config = config
        self.gateway_id = config.gateway_id or uuid.uuid4().hex[:12]
        self._provider = tracer_provider
        self._stopping = threading.Event()
        self.gate = Gate("gateway")

    def start(self) -> GatewayService:
        cfg = self.config
        if not cfg.redis_url:
            raise ValueError("the gateway needs --redis-url (or REDIS_URL)")
        security = self._security()
        credential = cfg.internal_credential()
        self.obs = TierObservability("gateway", host=cfg.host, metrics_port=cfg.metrics_port,
                                     tracer_provider=self._provider)
        self.redis = streams.connect(cfg.redis_url, **cfg.redis_options())
        self.tokenizer = GrpcTokenizerClient(cfg.tokenizer_address, credential=credential,
                                             ca_file=cfg.internal_tls_ca_file)
        self.core = GatewayCore(self.gateway_id, self.tokenizer, RedisIntake(self.redis),
                                request_timeout_s=cfg.request_timeout_s, tracer=self.obs.tracer)
        self.reader = OutputReader(streams.connect(cfg.redis_url, **cfg.redis_options()),
                                   self.gateway_id, self.core.router,
                                   on_restart=self.core.redis_restarted,
                                   on_outage=self.core.redis_lost, on_health=self._redis_health,
                                   outage_s=cfg.redis_outage_s)
        servicer = GatedServicer(self.gate, target=GatewayServicer(self.core))
        self.server = GrpcServer(cfg.host, cfg.port, {"Gateway": servicer},
                                 max_workers=cfg.max_workers, security=security,
                                 max_receive_bytes=4 * cfg.max_request_bytes,
                                 request_limit=cfg.max_request_bytes).start()
        threading.Thread(target=self._become_ready, name="readiness", daemon=True).start()
        return self

    def _security(self) -> ServerSecurity:
        cfg = self.config
        keys = KeyRing.from_sources(cfg.api_keys, cfg.api_keys_file)
        if keys is None and not cfg.allow_anonymous:
            raise ValueError("the gateway needs API keys (api_keys / TAXIWAY_API_KEYS, or "
                             "api_keys_file), or allow_anonymous to serve without them")
        if keys is None:
            log.warning("the gateway serves without API keys (allow_anonymous)")
        return ServerSecurity(keys, cfg.tls_cert_file, cfg.tls_key_file, cfg.reflection)

    def _redis_health(self, ok: bool) -> None:
        """Redis lost or back: health follows (new calls would fail meanwhile anyway)."""
        if self.gate.is_open:
            self.server.set_serving(ok)

    def _become_ready(self) -> None:
        """SERVING once Redis answers and the tokenizer tier describes the model."""
        while not self._stopping.is_set():
            try:
                self.redis.ping()
                info = self.tokenizer.model_info()
            except Exception as exc:  # noqa: BLE001 - not yet: try again
                log.info("gateway not ready yet: %s", exc)
                self._stopping.wait(0.5)
                continue
            self.core.metrics = GatewayMetrics(model_label(info.name), registry=self.obs.registry)
            self.gate.open()
            self.server.set_serving(True)
            log.info("gateway %s serving %s on %s", self.gateway_id, info.name, self.server.address)
            return

    def drain(self, timeout_s: float, interrupted: threading.Event | None = None) -> bool:
        """True when every request in flight ended within timeout_s."""
        self._stopping.set()
        self.gate.close("draining")  # first: nobody gets in once health says NOT_SERVING
        self.server.set_serving(False)
        return self.gate.wait_idle(timeout_s, interrupted)

    def stop(self) -> None:
        self._stopping.set()
        self.gate.close("stopped")
        self.server.stop(2.0)
        self.reader.stop()
        self.tokenizer.close()
        self.obs.close()
