"""The gateway's connections: the tokenizer tier over gRPC, the request stream and its own output
stream in Redis. Each implements an interface of core.py."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Sequence

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
    """TokenizerClient over taxiway.v1.Tokenizer (round-robin over a dns:/// target's replicas)."""

    def __init__(self, address: str):
        self.channel = channel(address, [("grpc.service_config", TOKENIZER_SERVICE_CONFIG)])
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


class _GrpcDetokenizer:
    """One Detokenize stream: each add() sends the tokens and waits for their text."""

    _END = object()

    def __init__(self, stub: Stub, setup):
        self._requests: queue.Queue = queue.Queue()
        self._requests.put(pb.DetokenizeRequest(setup=setup))
        self._call = stub.Detokenize(iter(self._requests.get, self._END), metadata=_trace_metadata())

    def add(self, token_ids: Sequence[int], flush: bool = False) -> tuple[str, str | None]:
        self._requests.put(pb.DetokenizeRequest(tokens=pb.TokenIds(ids=list(token_ids)), flush=flush))
        try:
            resp = next(self._call)
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc, "tokenizer tier") from None
        return resp.new_text, resp.stop or None

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
    """Reads taxiway:out:<gateway_id> from its own thread and routes each delta to its request."""

    def __init__(self, redis, gateway_id: str, router: Router):
        self._redis = redis
        self._key = streams.out_stream(gateway_id)
        self._router = router
        self._stop = threading.Event()
        self._redis.delete(self._key)  # a restarted gateway with a fixed id: old entries are void
        self._thread = threading.Thread(target=self._run, name="output-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = "0-0"
        while not self._stop.is_set():
            try:
                got = self._redis.xread({self._key: last}, count=1024, block=500)
            except Exception:  # noqa: BLE001 - Redis hiccup: retry
                if self._stop.is_set():
                    return
                log.exception("reading %s failed", self._key)
                self._stop.wait(1.0)
                continue
            for _, entries in got or ():
                for entry_id, fields in entries:
                    last = entry_id
                    try:
                        self._router.dispatch(convert.output_batch_from_bytes(fields[streams.FIELD]))
                    except Exception:  # noqa: BLE001
                        log.exception("bad entry %s in %s", entry_id, self._key)
            if got:
                self._redis.xtrim(self._key, minid=last, approximate=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self._redis.delete(self._key)
        except Exception:  # noqa: BLE001
            pass
