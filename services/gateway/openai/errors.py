"""taxiway's errors in OpenAI's error shape, each with its HTTP status (the OpenAI front's one
mapping, beside services/common/errors.py's gRPC one):

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse

from gpu_engine.errors import DeadlineExceeded, InvalidRequest, NotReady, Overloaded, TaxiwayError
from services.common.errors import LimitExceeded, Unauthenticated

log = logging.getLogger(__name__)


class ModelNotFound(TaxiwayError):
    def __init__(self, asked: str, served: str):
        super().__init__(f"The model `{asked}` does not exist: this server serves `{served}`")


class ClientGone(TaxiwayError):
    """The client disconnected before the answer was ready (nobody reads the response)."""


# error class -> (HTTP status, OpenAI error type, code); the first that matches wins
STATUS = (
    (ModelNotFound, 404, "not_found_error", "model_not_found"),
    (Unauthenticated, 401, "authentication_error", "invalid_api_key"),
    (LimitExceeded, 413, "invalid_request_error", "request_too_large"),
    (InvalidRequest, 400, "invalid_request_error", None),
    (Overloaded, 429, "rate_limit_error", "overloaded"),
    (NotReady, 503, "service_unavailable_error", "not_ready"),
    (DeadlineExceeded, 504, "timeout_error", "deadline_exceeded"),
    (ClientGone, 499, "client_closed_request", None),
)


def error_body(exc: BaseException) -> tuple[int, dict]:
    for cls, status, kind, code in STATUS:
        if isinstance(exc, cls):
            message = str(exc)
            break
    else:
        log.exception("internal error", exc_info=exc)
        status, kind, code = 500, "internal_error", None
        message = f"internal error: {type(exc).__name__}: {exc}"
    return status, {"error": {"message": message, "type": kind,
                              "param": getattr(exc, "param", None), "code": code}}


def error_response(exc: BaseException) -> JSONResponse:
    status, body = error_body(exc)
    return JSONResponse(body, status_code=status)


def stream_error(exc: BaseException) -> dict:
    """The error event of a stream whose status line was already sent."""
    return error_body(exc)[1]
