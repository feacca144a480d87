"""The gateway's connections, on its event loop: the tokenizer tier over grpc.aio, the request
stream and its own output stream in Redis (redis.asyncio). Each implements an interface of core.py."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence

import grpc

from gpu_engine.errors import NotReady
from services.common import convert, errors, streams
from services.common.auth import HEADER
from services.common.proto import Stub, pb
from services.common.server import aio_channel
from services.common.telemetry import inject_context
from services.common.types import Abort, EngineRequest, ModelInfo
from services.gateway.router import Router

log = logging.getLogger(__name__)
TOKENIZER_TIMEOUT_S = 30.0
MODEL_INFO_TTL_S = 30.0


def _chat_pb(messages: list[dict]):
    return pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"])
                                     for m in messages])


# Round-robin over a dns:/// target's replicas, skipping those whose health is not SERVING
# (starting or draining), and unary calls retried on UNAVAILABLE (on the next replica): a tokenizer
# that drains refuses new calls, and the client must not see it.
TOKENIZER_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
    "methodConfig": [{
        "name": [{"service": "taxiway.v1.Tokenizer", "method": "Tokenize"},
                 {"service": "taxiway.v1.Tokenizer", "method": "GetModelInfo"},
                 {"service": "taxiway.v1.Tokenizer", "method": "DecodeTokens"}],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
})


class GrpcTokenizerClient:
    """TokenizerClient over taxiway.v1.Tokenizer on grpc.aio (round-robin over a dns:/// target's
    replicas). credential: the internal token; ca_file: the tokenizers' CA when they serve TLS.
    Make it, and call it, on one event loop."""

    def __init__(self, address: str, *, credential: str | None = None, ca_file: str | None = None):
        self.channel = aio_channel(address, [("grpc.service_config", TOKENIZER_SERVICE_CONFIG)],
                                   ca_file=ca_file)
        self._stub = Stub(self.channel, "Tokenizer")
        self._auth = ((HEADER, f"Bearer {credential}"),) if credential else ()
        self._info: tuple[float, ModelInfo] | None = None
        self._strings: dict[int, str] = {}
        """token id -> its text, as DecodeTokens gave it (for logprobs)."""
        self._mux: DetokenizeMux | None = None
        """Every request's detokenizer, on one stream (made on first use, on the client's loop)."""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The internal credential and the current trace context (the request's span)."""
        return self._auth + tuple(inject_context().items())

    async def tokenize(self, text=None, messages=None, add_special_tokens=True):
        if messages is not None:
            req = pb.TokenizeRequest(messages=_chat_pb(messages))
        else:
            req = pb.TokenizeRequest(text=text or "", add_special_tokens=add_special_tokens)
        try:
            resp = await self._stub.Tokenize(req, timeout=TOKENIZER_TIMEOUT_S,
                                             metadata=self.metadata())
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc, "tokenizer tier") from None
        return list(resp.token_ids), resp.text

    async def detokenizer(self, prompt_token_ids, *, skip_special_tokens, stop,
                          include_stop_str_in_output):
        setup = pb.DetokenizeSetup(prompt_token_ids=list(prompt_token_ids),
                                   skip_special_tokens=skip_special_tokens, stop=list(stop),
                                   include_stop_str_in_output=include_stop_str_in_output)
        if self._mux is None:
            self._mux = DetokenizeMux(self._stub, self._auth)
        return self._mux.session(setup, inject_context())

    async def model_info(self) -> ModelInfo:
        now = time.monotonic()
        if self._info is None or now - self._info[0] > MODEL_INFO_TTL_S:
            try:
                msg = await self._stub.GetModelInfo(pb.GetModelInfoRequest(),
                                                    timeout=TOKENIZER_TIMEOUT_S,
                                                    metadata=self._auth)
            except grpc.RpcError as exc:
                raise errors.from_rpc_error(exc, "tokenizer tier") from None
            self._info = (now, convert.model_info_from_pb(msg))
        return self._info[1]

    async def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text (what OpenAI's logprobs call `token`), cached per id."""
        missing = sorted({t for t in token_ids if t not in self._strings})
        if missing:
            try:
                resp = await self._stub.DecodeTokens(pb.TokenIds(ids=missing),
                                                     timeout=TOKENIZER_TIMEOUT_S,
                                                     metadata=self._auth)
            except grpc.RpcError as exc:
                raise errors.from_rpc_error(exc, "tokenizer tier") from None
            self._strings.update(zip(missing, resp.strings))
        return [self._strings[t] for t in token_ids]

    async def close(self) -> None:
        if self._mux is not None:
            await self._mux.close()
        await self.channel.close()


REOPEN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                          grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
"""A detokenizer session that fails with one of these lost its replica (killed, connection reset,
draining): it is opened again, on another replica if the first is gone."""
REOPEN_BACKOFF_S = (0.0, 0.1, 0.3, 0.6, 1.2, 2.0)
"""Waits before each try to reopen a lost session (about 4 s in all: a replica that went away is
dropped from the channel's picks, another one may still be connecting)."""


class _StreamEnded(Exception):
    """A DetokenizeMany stream or one of its sessions ended before answering (its replica went away,
    drains, or the session failed there)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class DetokenizeMux:
    """Every detokenizer session of a gateway on one DetokenizeMany stream to the tokenizer tier.

    The items that the request tasks add in one turn of the event loop (a step's tokens for every
    stream that step reached) leave as one message and come back as one: an exchange costs the
    same for one session as for hundreds. New sessions start on the current stream; one that
    ended (its replica went away) or retires (its replica drains) is replaced by a new one, which
    the channel balances onto a replica that answers."""

    def __init__(self, stub: Stub, metadata: tuple[tuple[str, str], ...]):
        self._stub, self._metadata = stub, metadata
        self._stream: _MuxStream | None = None
        self._ids = itertools.count(1)

    def stream(self) -> tuple[_MuxStream, int]:
        """The stream a session (re)starts on, and the session's number there."""
        if self._stream is None or not self._stream.usable:
            self._stream = _MuxStream(self._stub.DetokenizeMany(metadata=self._metadata))
        return self._stream, next(self._ids)

    def session(self, setup, trace_context: dict[str, str]) -> _MuxSession:
        return _MuxSession(self, setup, trace_context)

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()


class _MuxStream:
    """One DetokenizeMany call: a writer task sends what is pending as one batch, a reader task
    hands each answer's results to the items of the batch it answers (in order)."""

    def __init__(self, call):
        self._call = call
        self._pending: list[tuple[object, asyncio.Future | None]] = []
        self._inflight: collections.deque[list[asyncio.Future]] = collections.deque()
        self._wake = asyncio.Event()
        self.ended: _StreamEnded | None = None
        self.retiring = False
        self._tasks = [asyncio.create_task(self._write(), name="detokenize-write"),
                       asyncio.create_task(self._read(), name="detokenize-read")]

    @property
    def usable(self) -> bool:
        return self.ended is None and not self.retiring

    def send(self, item, answer: bool = True) -> asyncio.Future | None:
        """Queue an item for the next batch; its future gets the item's DetokenizeResult (or the
        stream's end)."""
        future = asyncio.get_running_loop().create_future() if answer else None
        if self.ended is not None:
            if future is not None:
                future.set_exception(self.ended)
            return future
        self._pending.append((item, future))
        self._wake.set()
        return future

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                batch, self._pending = self._pending, []
                if not batch:
                    continue
                self._inflight.append([f for _, f in batch if f is not None])
                await self._call.write(pb.DetokenizeBatch(items=[item for item, _ in batch]))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the call failed: every session on it reopens
            self._end(exc)

    async def _read(self) -> None:
        try:
            while True:
                resp = await self._call.read()
                if resp is grpc.aio.EOF:
                    code = await self._call.code()
                    details = await self._call.details() or "the DetokenizeMany stream ended"
                    raise _StreamEnded(grpc.StatusCode.UNAVAILABLE if code is grpc.StatusCode.OK else code,
                                       details)
                futures = self._inflight.popleft()
                if len(futures) != len(resp.results):
                    raise _StreamEnded(grpc.StatusCode.INTERNAL, f"{len(resp.results)} results for "
                                       f"{len(futures)} items")
                for future, result in zip(futures, resp.results):
                    if not future.done():
                        future.set_result(result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._end(exc)

    def _end(self, exc: Exception) -> None:
        if self.ended is None:
            code = exc.code() if isinstance(exc, (grpc.RpcError, _StreamEnded)) else grpc.StatusCode.UNKNOWN
            details = exc.details() if isinstance(exc, (grpc.RpcError, _StreamEnded)) else repr(exc)
            self.ended = _StreamEnded(code, details)
        waiting = [f for batch in self._inflight for f in batch] + [f for _, f in self._pending if f is not None]
        if waiting and self.ended.code() in REOPEN_CODES:  # an idle stream's end (drain, shutdown) loses nothing
            log.warning("DetokenizeMany stream lost (%s: %s) with %d items unanswered; their sessions "
                        "reopen", self.ended.code().name, self.ended.details(), len(waiting))
        self._inflight.clear()
        self._pending = []
        for future in waiting:
            if not future.done():
                future.set_exception(self.ended)
        self._call.cancel()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def close(self) -> None:
        self._end(_StreamEnded(grpc.StatusCode.CANCELLED, "the gateway closed its tokenizer client"))
        await asyncio.gather(*self._tasks, return_exceptions=True)


class _MuxSession:
    """One request sample's detokenizer on a DetokenizeMux (DetokenizerSession): each add() sends
    the tokens and returns their text; the first carries the set-up.

    When its stream is lost or its replica drains, the session starts again on a new stream with
    every token so far at once; of the text that comes back, what the client already has is
    dropped: no gap, no duplicate. Text is a pure function of the token ids, so the replayed text
    begins with what was sent (checked)."""

    def __init__(self, mux: DetokenizeMux, setup, trace_context: dict[str, str]):
        self._mux, self._setup, self._trace = mux, setup, trace_context
        self._stream: _MuxStream | None = None
        self._id = 0
        self._tokens: list[int] = []
        self._text = ""
        """Everything this session released so far."""
        self._ended = False
        self.reopened = 0

    async def _exchange(self, token_ids: Sequence[int], flush: bool):
        first = self._stream is None
        if first:
            self._stream, self._id = self._mux.stream()
        item = pb.DetokenizeItem(session=self._id, tokens=pb.TokenIds(ids=list(token_ids)), flush=flush)
        if first:
            item.setup.CopyFrom(self._setup)
            item.trace_context.update(self._trace)
        result = await self._stream.send(item)
        if result.error_code:
            code = getattr(grpc.StatusCode, result.error_code, grpc.StatusCode.UNKNOWN)
            if code is grpc.StatusCode.UNAVAILABLE:
                self._stream.retiring = True  # it drains: later sessions start elsewhere
            raise _StreamEnded(code, result.error)
        if flush:
            self._ended = True
        return result

    async def add(self, token_ids: Sequence[int], flush: bool = False) -> tuple[str, str | None]:
        try:
            result = await self._exchange(token_ids, flush)
        except _StreamEnded as exc:
            if exc.code() not in REOPEN_CODES:
                raise errors.from_rpc_error(exc, "tokenizer tier") from None
            return await self._reopen(token_ids, flush, exc)
        self._tokens.extend(token_ids)
        self._text += result.new_text
        return result.new_text, result.stop or None

    async def _reopen(self, token_ids: Sequence[int], flush: bool, exc: _StreamEnded):
        tokens = [*self._tokens, *token_ids]
        for attempt, wait_s in enumerate(REOPEN_BACKOFF_S, 1):
            log.warning("detokenizer session lost (%s: %s); reopening with %d tokens (try %d)",
                        exc.code().name, exc.details(), len(tokens), attempt)
            await asyncio.sleep(wait_s)
            self._stream = None
            try:
                result = await self._exchange(tokens, flush)
            except _StreamEnded as again:
                exc = again
                if again.code() not in REOPEN_CODES:
                    break
                continue
            if not result.new_text.startswith(self._text):
                raise errors.TaxiwayError("the reopened detokenizer session disagrees with the text "
                                          "already sent")
            new = result.new_text[len(self._text):]
            self._tokens, self._text = tokens, result.new_text
            self.reopened += 1
            return new, result.stop or None
        raise errors.from_rpc_error(exc, "tokenizer tier (detokenizer reopened)") from None

    async def aclose(self) -> None:
        """Forgets the session on the tier (a flushed one is gone there already)."""
        if self._stream is not None and not self._ended and self._stream.ended is None:
            self._stream.send(pb.DetokenizeItem(session=self._id, close=True), answer=False)
        self._ended = True


class RedisIntake:
    """Intake over the taxiway:requests stream (a redis.asyncio client)."""

    def __init__(self, redis):
        self._redis = redis

    async def submit(self, request: EngineRequest) -> None:
        await self._add(convert.queue_entry_to_bytes(request))

    async def abort(self, abort: Abort) -> None:
        await self._add(convert.queue_entry_to_bytes(abort))

    async def _add(self, data: bytes) -> None:
        try:
            await self._redis.xadd(streams.REQUESTS_STREAM, {streams.FIELD: data})
        except Exception as exc:  # noqa: BLE001 - redis errors vary; the caller sees UNAVAILABLE
            raise NotReady(f"cannot reach Redis: {exc}") from None


class OutputReader:
    """Reads taxiway:out:<gateway_id> in a task of the gateway's loop and routes each delta to its
    request (redis.asyncio: one blocking XREAD at a time, no thread).

    It also watches Redis for the gateway: a new server id (Redis restarted, or a replica took
    over) calls `on_restart` (the requests in flight are submitted again), and Redis unreachable
    for `outage_s` calls `on_outage` once (they fail with UNAVAILABLE) and `on_health(False)`
    until it answers again. The callbacks run on the loop; on_health may return a coroutine."""

    CHECK_S = 1.0
    """Seconds between looks at the server id."""
    TRIM_S = 1.0
    """Seconds between trims of the stream up to what was read: a trim after every read put a
    second Redis round trip (two turns of a busy loop) between one step's XREAD and the next's,
    and the next step's entry then waited (bench/serve_itl.py)."""

    def __init__(self, redis, gateway_id: str, router: Router, *,
                 on_restart: Callable[[], object] = lambda: None,
                 on_outage: Callable[[str], object] = lambda reason: None,
                 on_health: Callable[[bool], object] = lambda ok: None, outage_s: float = 10.0):
        self._redis = redis
        self._key = streams.out_stream(gateway_id)
        self._router = router
        self._on_restart, self._on_outage, self._on_health = on_restart, on_outage, on_health
        self._outage_s = outage_s
        self._reported = False
        self._task: asyncio.Task | None = None

    async def start(self) -> OutputReader:
        await self._redis.delete(self._key)  # a restarted gateway with a fixed id: old entries are void
        self._server = await _server_id(self._redis)
        self._task = asyncio.create_task(self._run(), name="output-reader")
        return self

    async def _run(self) -> None:
        last = "0-0"
        next_check = time.monotonic() + self.CHECK_S
        next_trim = time.monotonic() + self.TRIM_S
        down_since: float | None = None
        while True:
            try:
                got = await self._redis.xread({self._key: last}, count=1024, block=500)
                if down_since is not None or time.monotonic() >= next_check:
                    next_check = time.monotonic() + self.CHECK_S
                    await self._check_server(down_since)
                down_since = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis hiccup: retry
                down_since = await self._unreachable(down_since, exc)
                await asyncio.sleep(0.2)
                continue
            for _, entries in got or ():
                for entry_id, fields in entries:
                    last = entry_id
                    try:
                        self._router.dispatch(convert.output_batch_from_bytes(fields[streams.FIELD]))
                    except Exception:  # noqa: BLE001
                        log.exception("bad entry %s in %s", entry_id, self._key)
            if got and time.monotonic() >= next_trim:
                next_trim = time.monotonic() + self.TRIM_S
                await self._trim(last)

    async def _check_server(self, down_since: float | None) -> None:
        server = await _server_id(self._redis)
        if down_since is not None:
            self._reported = False
            await _maybe_await(self._on_health(True))
        if server != self._server:
            self._server = server
            log.warning("Redis restarted (new server id %s): the requests in flight are "
                        "submitted again", server)
            self._on_restart()

    async def _unreachable(self, down_since: float | None, exc: Exception) -> float:
        now = time.monotonic()
        if down_since is None:
            log.warning("reading %s failed: %s", self._key, exc)
            return now
        if now - down_since >= self._outage_s and not self._reported:  # once per outage
            self._reported = True
            await _maybe_await(self._on_health(False))
            self._on_outage(f"unreachable for {now - down_since:.0f}s ({exc})")
        return down_since

    async def _trim(self, last) -> None:
        try:
            await self._redis.xtrim(self._key, minid=last, approximate=True)
        except Exception as exc:  # noqa: BLE001 - the next read trims again
            log.info("trimming %s failed: %s", self._key, exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self._redis.delete(self._key)
        except Exception:  # noqa: BLE001
            pass
        await self._redis.aclose()


async def _server_id(redis) -> str:
    return str((await redis.info("server"))["run_id"])


async def _maybe_await(value) -> None:
    if asyncio.iscoroutine(value):
        await value
