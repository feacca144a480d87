"""The OpenAI-compatible HTTP API of the gateway tier: Starlette on uvicorn, served on its own port
in the gateway's event loop and calling GatewayCore directly (no gRPC hop). The same API keys
(KeyRing.authenticate of the `Authorization` header), the same gate (starting, draining), the same
limits; errors in OpenAI's shape with their HTTP status; a client that disconnects aborts its
request (its task is cancelled, as a gRPC cancellation does)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.common.auth import KeyRing
from services.common.drain import Gate
from services.common.errors import LimitExceeded
from services.gateway.core import GatewayCore
from services.gateway.openai.errors import ClientGone, ModelNotFound, error_response, stream_error
from services.gateway.openai.protocol import Answer, Call, parse_chat, parse_completion

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIServer:
    """start() binds the port (an OSError naming it when taken) and serves; stop() closes it."""

    def __init__(self, core: GatewayCore, gate: Gate, keys: KeyRing | None, config):
        self.core, self.gate, self.keys, self.config = core, gate, keys, config
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ])
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls_cert_file else "http"
        return f"{scheme}://{self.config.host}:{self.port}"

    async def start(self) -> OpenAIServer:
        cfg = self.config
        sock = _listen(cfg.host, cfg.openai_port, cfg.reuse_port)
        self.port = sock.getsockname()[1]
        uv = uvicorn.Config(self.app, lifespan="off", log_level="warning", access_log=False,
                            ssl_certfile=cfg.tls_cert_file, ssl_keyfile=cfg.tls_key_file,
                            timeout_graceful_shutdown=2, timeout_keep_alive=30)
        self._server = uvicorn.Server(uv)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="openai-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the OpenAI API server on {self.url} stopped at start-up")
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)

    # -- routes ------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return Response(status_code=200 if self.gate.is_open else 503)

    async def models(self, request: Request) -> Response:
        try:
            self._caller(request)
            info = await self.core.tokenizer.model_info()
        except Exception as exc:  # noqa: BLE001 - every error leaves in OpenAI's shape
            return error_response(exc)
        return JSONResponse({"object": "list", "data": [{
            "id": info.name, "object": "model", "created": 0, "owned_by": "taxiway",
            "max_model_len": info.max_context_length, "vocab_size": info.vocab_size}]})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, parse_chat)

    # -- the work ----------------------------------------------------------------------------------

    async def _generate(self, request: Request, parse) -> Response:
        entered = False
        try:
            caller = self._caller(request)
            call = parse(await self._json(request))
            model = (await self.core.tokenizer.model_info()).name
            if call.model is not None and call.model != model:
                raise ModelNotFound(call.model, model)
            self.gate.enter()
            entered = True
            answer = Answer(call, uuid.uuid4().hex, int(time.time()), model,
                            self.core.tokenizer.token_strings)
            chunks = self.core.generate(call.inp, caller=caller)
            if not call.stream:
                await _until_disconnect(request, _collect(chunks, answer))
                return JSONResponse(answer.final())
            first = await _until_disconnect(request, _first(chunks, answer))
        except Exception as exc:  # noqa: BLE001 - every error leaves in OpenAI's shape
            if entered:
                self.gate.leave()
            return error_response(exc)
        entered = False
        return StreamingResponse(self._events(call, answer, chunks, first),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    async def _events(self, call: Call, answer: Answer, chunks, first: list[dict]):
        """The SSE stream after its first chunk; the gate is left when it ends (or is cancelled:
        the client went away, and the core aborts the request)."""
        try:
            for obj in first:
                yield _event(obj)
            try:
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        obj = await answer.add(chunk)
                        if obj is not None:
                            yield _event(obj)
            except Exception as exc:  # noqa: BLE001 - the status line is gone: an error event
                yield _event(stream_error(exc))
                yield "data: [DONE]\n\n"
                return
            if call.include_usage:
                yield _event(answer.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            self.gate.leave()

    def _caller(self, request: Request) -> str:
        if self.keys is None:
            client = request.client
            return f"peer:{client.host}:{client.port}" if client else "peer:unknown"
        return self.keys.authenticate(request.headers.get("authorization"))

    async def _json(self, request: Request):
        limit = self.config.max_request_bytes
        size = int(request.headers.get("content-length") or 0)
        if size > limit:
            raise LimitExceeded(f"the request is {size} bytes; this server accepts at most {limit} "
                                "(max_request_bytes): send a shorter prompt")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise LimitExceeded(f"the request is over {limit} bytes, what this server accepts "
                                    "(max_request_bytes): send a shorter prompt")
        try:
            return json.loads(body)
        except ValueError as exc:
            from services.gateway.openai.body import BadParam

            raise BadParam(None, f"the request body is not valid JSON: {exc}") from None


async def _first(chunks, answer: Answer) -> list[dict]:
    """The stream chunks up to the first one there is (so that an error before it still gets its
    HTTP status)."""
    out: list[dict] = []
    while not out:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except BaseException:
            await chunks.aclose()
            raise
        obj = await answer.add(chunk)
        if obj is not None:
            out.append(obj)
    return out


async def _collect(chunks, answer: Answer) -> None:
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            await answer.add(chunk)


async def _until_disconnect(request: Request, coro):
    """Runs `coro`; cancels it (and raises ClientGone) if the client disconnects first."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise ClientGone()
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # several gateway processes share the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} (openai_port): {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock
