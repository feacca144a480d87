"""The gateway's connections: the tokenizer tier over gRPC, the request stream and its own output
stream in Redis. Each implements an interface of core.py."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from services.common import convert, errors, streams
from services.common.proto import Stub, pb
from services.common.server import channel
from services.common.telemetry import inject_context
from services.common.types import Abort, EngineRequest, ModelInfo
from services.gateway.router import Router

log = logging.getLogger(__name__)
TOKENIZER_TIMEOUT_S = 30.0
MODEL_INFO_TTL_S = 30.0


def _trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context (the request's span) as gRPC metadata."""
    return tuple(inject_context().items())


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
                 {"service": "taxiway.v1.Tokenizer", "method": "GetModelInfo"}],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
})


class GrpcTokenizerClient:
    """TokenizerClient over taxiway.v1.Tokenizer (round-robin over a dns:/// target's replicas).
    credential: the internal token; ca_file: the tokenizers' CA when they serve TLS."""

    def __init__(self, address: str, *, credential: str | None = None, ca_file: str | None = None):
        self.channel = channel(address, [("grpc.service_config", TOKENIZER_SERVICE_CONFIG)],
                               credential=credential, ca_file=ca_file)
        self._stub = Stub(self.channel, "Tokenizer")
        self._info: tuple[float, ModelInfo] | None = None

    def tokenize(self, text=None, messages=None, add_special_tokens=True):
        if messages is not None:
            req = pb.TokenizeRequest(messages=_chat_pb(messages))
        else:
            req = pb.TokenizeRequest(text=text or "", add_special_tokens=add_special_tokens)
        try:
            resp = self._stub.Tokenize(req, timeout=TOKENIZER_TIMEOUT_S, metadata=_trace_metadata())
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc, "tokenizer tier") from None
        return list(resp.token_ids), resp.text

    def detokenizer(self, prompt_token_ids, *, skip_special_tokens, stop,
                    include_stop_str_in_output):
        setup = pb.DetokenizeSetup(prompt_token_ids=list(prompt_token_ids),
                                   skip_special_tokens=skip_special_tokens, stop=list(stop),
                                   include_stop_str_in_output=include_stop_str_in_output)
        return _GrpcDetokenizer(self._stub, setup)

    def model_info(self) -> ModelInfo:
        now = time.monotonic()
        if self._info is None or now - self._info[0] > MODEL_INFO_TTL_S:
            try:
                msg = self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TOKENIZER_TIMEOUT_S)
            except grpc.RpcError as exc:
                raise errors.from_rpc_error(exc, "tokenizer tier") from None
            self._info = (now, convert.model_info_from_pb(msg))
        return self._info[1]

    def close(self) -> None:
        self.channel.close()


REOPEN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                          grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
"""A Detokenize stream that ends with one of these lost its replica (killed, connection reset):
it is opened again, on another replica if the first is gone."""
REOPEN_BACKOFF_S = (0.0, 0.1, 0.3, 0.6, 1.2, 2.0)
"""Waits before each try to reopen a lost Detokenize stream (about 4 s in all: a replica that
went away is dropped from the channel's picks, another one may still be connecting)."""


class _GrpcDetokenizer:
    """One Detokenize stream: each add() sends the tokens and waits for their text.

    When the tokenizer replica goes away mid-stream, the stream is opened again (the channel
    balances it onto a replica that answers) and fed every token so far at once; of the text that
    comes back, what the client already has is dropped: no gap, no duplicate. Text is a pure
    function of the token ids, so the replayed text begins with what was sent (checked)."""

    _END = object()

    def __init__(self, stub: Stub, setup):
        self._stub = stub
        self._setup = setup
        self._tokens: list[int] = []
        self._text = ""
        """Everything this stream released so far."""
        self.reopened = 0
        self._open()

    def _open(self) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._requests.put(pb.DetokenizeRequest(setup=self._setup))
        self._call = self._stub.Detokenize(iter(self._requests.get, self._END),
                                           metadata=_trace_metadata())

    def _exchange(self, token_ids: Sequence[int], flush: bool):
        self._requests.put(pb.DetokenizeRequest(tokens=pb.TokenIds(ids=list(token_ids)), flush=flush))
        return next(self._call)

    def add(self, token_ids: Sequence[int], flush: bool = False) -> tuple[str, str | None]:
        try:
            resp = self._exchange(token_ids, flush)
        except grpc.RpcError as exc:
            if exc.code() not in REOPEN_CODES:
                raise errors.from_rpc_error(exc, "tokenizer tier") from None
            return self._reopen(token_ids, flush, exc)
        self._tokens.extend(token_ids)
        self._text += resp.new_text
        return resp.new_text, resp.stop or None

    def _reopen(self, token_ids: Sequence[int], flush: bool, exc: grpc.RpcError):
        tokens = [*self._tokens, *token_ids]
        for attempt, wait_s in enumerate(REOPEN_BACKOFF_S, 1):
            log.warning("Detokenize stream lost (%s: %s); reopening with %d tokens (try %d)",
                        exc.code().name, exc.details(), len(tokens), attempt)
            self._call.cancel()
            time.sleep(wait_s)
            self._open()
            try:
                resp = self._exchange(tokens, flush)
            except grpc.RpcError as again:
                exc = again
                if again.code() not in REOPEN_CODES:
                    break
                continue
            if not resp.new_text.startswith(self._text):
                raise errors.TaxiwayError("the reopened Detokenize stream disagrees with the text "
                                          "already sent")
            new = resp.new_text[len(self._text):]
            self._tokens, self._text = tokens, resp.new_text
            self.reopened += 1
            return new, resp.stop or None
        raise errors.from_rpc_error(exc, "tokenizer tier (Detokenize reopened)") from None

    def close(self) -> None:
        self._requests.put(self._END)  # half-close: the tokenizer's handler ends on its own


class RedisIntake:
    """Intake over the taxiway:requests stream."""

    def __init__(self, redis):
        self._redis = redis

    def submit(self, request: EngineRequest) -> None:
        self._add(convert.queue_entry_to_bytes(request))

    def abort(self, abort: Abort) -> None:
        self._add(convert.queue_entry_to_bytes(abort))

    def _add(self, data: bytes) -> None:
        try:
            self._redis.xadd(streams.REQUESTS_STREAM, {streams.FIELD: data})
        except Exception as exc:  # noqa: BLE001 - redis errors vary; the caller sees UNAVAILABLE
            from gpu_engine.errors import NotReady

            raise NotReady(f"cannot reach Redis: {exc}") from None


class OutputReader:
    """Reads taxiway:out:<gateway_id> from its own thread and routes each delta to its request.

    It also watches Redis for the gateway: a new server id (Redis restarted, or a replica took
    over) calls `on_restart` (the requests in flight are submitted again), and Redis unreachable
    for `outage_s` calls `on_outage` once (they fail with UNAVAILABLE) and `on_health(False)`
    until it answers again."""

    CHECK_S = 1.0
    """Seconds between looks at the server id."""

    def __init__(self, redis, gateway_id: str, router: Router, *,
                 on_restart: Callable[[], object] = lambda: None,
                 on_outage: Callable[[str], object] = lambda reason: None,
                 on_health: Callable[[bool], object] = lambda ok: None, outage_s: float = 10.0):
        self._redis = redis
        self._key = streams.out_stream(gateway_id)
        self._router = router
        self._on_restart, self._on_outage, self._on_health = on_restart, on_outage, on_health
        self._outage_s = outage_s
        self._stop = threading.Event()
        self._redis.delete(self._key)  # a restarted gateway with a fixed id: old entries are void
        self._server = streams.server_id(self._redis)
        self._reported = False
        self._thread = threading.Thread(target=self._run, name="output-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = "0-0"
        next_check = time.monotonic() + self.CHECK_S
        down_since: float | None = None
        while not self._stop.is_set():
            try:
                got = self._redis.xread({self._key: last}, count=1024, block=500)
                if down_since is not None or time.monotonic() >= next_check:
                    next_check = time.monotonic() + self.CHECK_S
                    self._check_server(down_since)
                down_since = None
            except Exception as exc:  # noqa: BLE001 - Redis hiccup: retry
                if self._stop.is_set():
                    return
                down_since = self._unreachable(down_since, exc)
                self._stop.wait(0.2)
                continue
            for _, entries in got or ():
                for entry_id, fields in entries:
                    last = entry_id
                    try:
                        self._router.dispatch(convert.output_batch_from_bytes(fields[streams.FIELD]))
                    except Exception:  # noqa: BLE001
                        log.exception("bad entry %s in %s", entry_id, self._key)
            if got:
                self._trim(last)

    def _check_server(self, down_since: float | None) -> None:
        server = streams.server_id(self._redis)
        if down_since is not None:
            self._reported = False
            self._on_health(True)
        if server != self._server:
            self._server = server
            log.warning("Redis restarted (new server id %s): the requests in flight are "
                        "submitted again", server)
            self._on_restart()

    def _unreachable(self, down_since: float | None, exc: Exception) -> float:
        now = time.monotonic()
        if down_since is None:
            log.warning("reading %s failed: %s", self._key, exc)
            return now
        if now - down_since >= self._outage_s and not self._reported:  # once per outage
            self._reported = True
            self._on_health(False)
            self._on_outage(f"unreachable for {now - down_since:.0f}s ({exc})")
        return down_since

    def _trim(self, last) -> None:
        try:
            self._redis.xtrim(self._key, minid=last, approximate=True)
        except Exception as exc:  # noqa: BLE001 - the next read trims again
            log.info("trimming %s failed: %s", self._key, exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self._redis.delete(self._key)
        except Exception:  # noqa: BLE001
            pass
