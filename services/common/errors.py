"""The one mapping between taxiway's errors and gRPC status codes, both ways.

Servers get `ErrorInterceptor`, which turns a raised `TaxiwayError` into its status; clients of
other tiers turn an `grpc.RpcError` back with `from_rpc_error`; Redis entries carry errors by
class name (`to_wire` / `from_wire`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import grpc

from gpu_engine.errors import DeadlineExceeded, InvalidRequest, NotReady, Overloaded, TaxiwayError

log = logging.getLogger(__name__)


class Unauthenticated(TaxiwayError):
    """No valid credential (API key, or the tiers' internal credential) came with the call."""


class LimitExceeded(TaxiwayError):
    """The request is larger than a documented limit (its message size): it can never succeed."""


# taxiway error -> gRPC status; the reverse mapping is derived from it (for RESOURCE_EXHAUSTED:
# Overloaded, the first one listed).
STATUS_OF: dict[type[TaxiwayError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}
_ERROR_OF: dict[grpc.StatusCode, type[TaxiwayError]] = {}
for _cls, _code in STATUS_OF.items():
    _ERROR_OF.setdefault(_code, _cls)
_BY_NAME = {cls.__name__: cls for cls in STATUS_OF}


def status_of(exc: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS_OF.items():
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def from_rpc_error(err: grpc.RpcError, what: str = "") -> TaxiwayError:
    """The taxiway error for a failed call to another tier (UNAVAILABLE and unknown codes: NotReady)."""
    code = err.code() if hasattr(err, "code") else None
    detail = err.details() if hasattr(err, "details") else str(err)
    if code is grpc.StatusCode.UNAUTHENTICATED:  # our own credential, not the client's: INTERNAL
        return TaxiwayError(f"{what or 'another tier'} refused this tier's internal credential "
                            f"(set the same internal_token on every tier): {detail}")
    cls = _ERROR_OF.get(code, NotReady)
    prefix = f"{what}: " if what and cls is NotReady else ""
    return cls(f"{prefix}{detail}")


def to_wire(exc: BaseException) -> tuple[str, str]:
    """(kind, message) for an ErrorInfo entry."""
    kind = next((cls.__name__ for cls in STATUS_OF if isinstance(exc, cls)), "TaxiwayError")
    return kind, str(exc)


def from_wire(kind: str, message: str) -> TaxiwayError:
    return _BY_NAME.get(kind, TaxiwayError)(message)


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error")
        context.abort(code, f"internal error: {type(exc).__name__}: {exc}")
    context.abort(code, str(exc))


def _finished(context: grpc.ServicerContext, exc: Exception) -> bool:
    """The client cancelled or went away (its request stream raised): nobody to answer."""
    return isinstance(exc, grpc.RpcError) and not context.is_active()


def _unary(fn):
    def handler(request, context):
        try:
            return fn(request, context)
        except Exception as exc:  # noqa: BLE001 - every error leaves through one status
            if _finished(context, exc):
                return None
            if context.code() is not None:  # already aborted on purpose
                raise
            _abort(context, exc)

    return handler


def _streaming(fn):
    def handler(request, context):
        try:
            yield from fn(request, context)
        except Exception as exc:  # noqa: BLE001 - every error leaves through one status
            if _finished(context, exc):
                return None
            if context.code() is not None:  # already aborted on purpose
                raise
            _abort(context, exc)

    return handler


def wrap_handler(handler, unary, streaming):
    """A method handler (of a server interceptor) with its behaviour wrapped by `unary` (methods
    with a unary response) or `streaming` (streamed responses); None stays None."""
    if handler is None:
        return None
    for kind, wrap in (("unary_unary", unary), ("stream_unary", unary), ("unary_stream", streaming)):
        if getattr(handler, kind):
            return handler._replace(**{kind: wrap(getattr(handler, kind))})
    return handler._replace(stream_stream=streaming(handler.stream_stream))


class ErrorInterceptor(grpc.ServerInterceptor):
    """Wraps every handler so that a raised error becomes its one gRPC status."""

    def intercept_service(self, continuation, handler_call_details):
        return wrap_handler(continuation(handler_call_details), _unary, _streaming)


# -- the same mapping on grpc.aio servers ------------------------------------------------------------

async def _aio_abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error")
        await context.abort(code, f"internal error: {type(exc).__name__}: {exc}")
    await context.abort(code, str(exc))


def _aio_unary(fn):
    async def handler(request, context):
        try:
            return await fn(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise  # the client went away, or the handler aborted on purpose
        except Exception as exc:  # noqa: BLE001 - every error leaves through one status
            await _aio_abort(context, exc)

    return handler


def _aio_streaming(fn):
    if inspect.iscoroutinefunction(fn):  # a streaming handler that writes (grpc's health Watch)
        return _aio_unary(fn)

    async def handler(request, context):
        try:
            async for item in fn(request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - every error leaves through one status
            await _aio_abort(context, exc)

    return handler


class AioErrorInterceptor(grpc.aio.ServerInterceptor):
    """ErrorInterceptor for grpc.aio servers (handlers are coroutines and async generators)."""

    async def intercept_service(self, continuation, handler_call_details):
        return wrap_handler(await continuation(handler_call_details), _aio_unary, _aio_streaming)
