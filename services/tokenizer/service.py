"""The tokenizer tier's gRPC shell: taxiway.v1.Tokenizer over TokenizerCore, with a span and a
latency observation per call (per Detokenize message for the streams).

It serves on grpc.aio (an event loop in a thread of its own). A gateway keeps one DetokenizeMany
stream here for all its requests (each message: a step's tokens of many of them; each request a
session with a span of its own); the older Detokenize holds one stream per request. Detokenizing
a step's tokens takes microseconds and runs on the loop; Tokenize (a long prompt, a chat template)
runs in the loop's thread pool."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from gpu_engine.errors import InvalidRequest, NotReady
from services.common import convert
from services.common.aio import LoopThread
from services.common.drain import AioGatedServicer, Gate
from services.common.metrics import TokenizerMetrics
from services.common.observe import TierObservability, model_label
from services.common.proto import pb
from services.common.server import AioGrpcServer, ServerSecurity
from services.common.telemetry import extract_context
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.core import TokenizerCore, load_core

log = logging.getLogger(__name__)


DRAIN_POLL_S = 0.25
"""How often an idle DetokenizeMany stream looks whether its replica drains (it then ends once it
holds no session)."""


class TokenizerServicer:
    def __init__(self, core: TokenizerCore, tracer: trace.Tracer, metrics: TokenizerMetrics,
                 draining: Callable[[], bool] = lambda: False):
        self.core = core
        self._tracer = tracer
        self._metrics = metrics
        self._draining = draining

    async def Tokenize(self, request, context):
        with self._span("Tokenize", context), self._timed("Tokenize"):
            ids, text = await asyncio.to_thread(self.core.tokenize,
                                                **convert.tokenize_request_from_pb(request))
        return pb.TokenizeResponse(token_ids=ids, text=text)

    async def Detokenize(self, request_iterator, context):
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "setup":
            raise InvalidRequest("the first Detokenize message must be a setup")
        detok = self.core.detokenizer(**convert.detokenize_setup_from_pb(first.setup))
        # a stream: the span is not made current across yields, only ended at the stream's end
        span = self._tracer.start_span("Detokenize", extract_context(context.invocation_metadata()),
                                       kind=SpanKind.SERVER)
        try:
            async for msg in request_iterator:
                with self._timed("Detokenize"):
                    text, stop = detok.add(msg.tokens.ids, flush=msg.flush)
                yield pb.DetokenizeResponse(new_text=text, stop=stop or "")
        finally:
            span.end()

    async def DetokenizeMany(self, request_iterator, context):
        sessions: dict[int, tuple[object, trace.Span]] = {}
        inbox: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            """Feeds the inbox; then None (the gateway half-closed) or the read's exception."""
            try:
                async for batch in request_iterator:
                    inbox.put_nowait(batch)
            except Exception as exc:  # noqa: BLE001 - handed to the handler, which raises it
                inbox.put_nowait(exc)
            else:
                inbox.put_nowait(None)

        reader = asyncio.create_task(pump())
        try:
            while True:
                try:
                    batch = await asyncio.wait_for(inbox.get(), DRAIN_POLL_S)
                except asyncio.TimeoutError:  # (not the builtin TimeoutError before Python 3.11)
                    if self._draining() and not sessions:
                        return  # the gateway opens its next sessions on another replica
                    continue
                if isinstance(batch, Exception):
                    raise batch  # the stream failed: the gateway's sessions reopen elsewhere
                if batch is None:
                    return
                results = (self._detokenize_item(item, sessions) for item in batch.items)
                yield pb.DetokenizeBatchResult(results=[r for r in results if r is not None])
                if self._draining() and not sessions:
                    return
        finally:
            reader.cancel()
            for _, span in sessions.values():
                span.end()

    def _detokenize_item(self, item, sessions: dict) -> pb.DetokenizeResult | None:
        """One item of a DetokenizeMany batch: its result (None for a close)."""
        if item.close:
            _, span = sessions.pop(item.session, (None, None))
            if span is not None:
                span.end()
            return None
        try:
            if item.HasField("setup"):
                if self._draining():
                    raise NotReady("tokenizer is draining")
                span = self._tracer.start_span("Detokenize", extract_context(item.trace_context),
                                               kind=SpanKind.SERVER)
                sessions[item.session] = (self.core.detokenizer(**convert.detokenize_setup_from_pb(item.setup)), span)
            elif item.session not in sessions:
                raise InvalidRequest(f"session {item.session} was never set up on this stream (or has ended)")
            detok, span = sessions[item.session]
            with self._timed("Detokenize"):
                text, stop = detok.add(item.tokens.ids, flush=item.flush)
        except (NotReady, InvalidRequest, ValueError) as exc:
            _, span = sessions.pop(item.session, (None, None))
            if span is not None:
                span.end()
            code = "UNAVAILABLE" if isinstance(exc, NotReady) else "INVALID_ARGUMENT"
            return pb.DetokenizeResult(session=item.session, error_code=code, error=str(exc))
        if item.flush:
            sessions.pop(item.session)
            span.end()
        return pb.DetokenizeResult(session=item.session, new_text=text, stop=stop or "")

    async def GetModelInfo(self, request, context):
        return convert.model_info_to_pb(self.core.info)

    async def DecodeTokens(self, request, context):
        return pb.TokenStrings(strings=self.core.token_strings(list(request.ids)))

    def _span(self, name: str, context):
        return self._tracer.start_as_current_span(
            name, extract_context(context.invocation_metadata()), kind=SpanKind.SERVER)

    @contextmanager
    def _timed(self, method: str):
        t0 = time.perf_counter()
        yield
        self._metrics.observe(method, time.perf_counter() - t0)


class TokenizerService:
    """Listens at once (NOT_SERVING, calls UNAVAILABLE) while the tokenizer loads; then serves.
    drain(): NOT_SERVING, new calls UNAVAILABLE, open Detokenize streams run to their end."""

    def __init__(self, config: TokenizerConfig, core: TokenizerCore | None = None, *,
                 tracer_provider: trace.TracerProvider | None = None):
        self.config = config
        self._core = core
        self._provider = tracer_provider
        self.gate = Gate("tokenizer")

    def start(self) -> TokenizerService:
        cfg = self.config
        self.obs = TierObservability("tokenizer", host=cfg.host, metrics_port=cfg.metrics_port,
                                     tracer_provider=self._provider)
        gated = AioGatedServicer(self.gate)
        self._loop = LoopThread("tokenizer")

        async def listen() -> AioGrpcServer:
            return await AioGrpcServer(cfg.host, cfg.port, {"Tokenizer": gated},
                                       security=ServerSecurity.internal(cfg)).start()

        try:
            self.server = self._loop.run(listen(), 30)
            core = self._core or load_core(cfg)
        except BaseException:
            self._loop.stop()
            self.obs.close()
            raise
        metrics = TokenizerMetrics(model_label(core.info.name), registry=self.obs.registry)
        gated.target = TokenizerServicer(core, self.obs.tracer, metrics,
                                         draining=lambda: not self.gate.is_open)
        self.gate.open()
        self._loop.run(self.server.set_serving(True))
        log.info("tokenizer tier serving %s on %s", core.info.name, self.server.address)
        return self

    @property
    def port(self) -> int:
        return self.server.port

    def drain(self, timeout_s: float, interrupted=None) -> bool:
        """True when every call in flight ended within timeout_s."""
        self.gate.close("draining")  # first: nobody gets in once health says NOT_SERVING
        self._loop.run(self.server.set_serving(False))
        return self.gate.wait_idle(timeout_s, interrupted)

    def stop(self, grace: float = 1.0) -> None:
        self.gate.close("stopped")
        try:
            self._loop.run(self.server.stop(grace), grace + 5)
        finally:
            self._loop.stop()
            self.obs.close()


def build(config: TokenizerConfig, core: TokenizerCore | None = None, *,
          tracer_provider: trace.TracerProvider | None = None) -> TokenizerService:
    """A started tokenizer tier."""
    return TokenizerService(config, core, tracer_provider=tracer_provider).start()
