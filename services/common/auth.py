"""Who may call a tier: API keys on the public gateway, one shared credential between the tiers.

Both travel as gRPC metadata `authorization: Bearer <secret>` and are checked by `KeyRing`, which
keeps only SHA-256 digests and compares a presented secret's digest with every known one through
hmac.compare_digest, so neither the answer nor its timing says which key came close:

    keys = KeyRing.from_sources(text=os.environ.get("TAXIWAY_API_KEYS"), file="keys.txt")
    caller = keys.authenticate("Bearer sk-...")   # the caller id, or raises Unauthenticated

`authenticate` is a plain function of the header, so an HTTP front (an OpenAI-compatible
endpoint) can reuse it. On a gRPC server, `AuthInterceptor` runs it for every method but health
and reflection, and makes the caller id readable by the handler (`current_caller()`). On the
client side, `with_credential(channel, secret)` adds the header to every call of a channel.
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import hmac
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import grpc

from services.common.errors import Unauthenticated, wrap_handler

HEADER = "authorization"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Methods anyone may call: health (probes, load balancers) and reflection (turn it off with
`reflection: false` where the API itself is private)."""

_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("taxiway_caller", default="")


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class KeyRing:
    """Known secrets (as digests) and the caller id of each."""

    def __init__(self, keys: Iterable[tuple[str, str]]):
        """keys: (caller id, secret) pairs; the caller id may be empty (then derived)."""
        self._entries: list[tuple[bytes, str]] = []
        for name, secret in keys:
            if not secret:
                raise ValueError("an API key is empty")
            digest = _digest(secret)
            self._entries.append((digest, name or f"key-{digest.hex()[:8]}"))
        if not self._entries:
            raise ValueError("no keys given")

    @classmethod
    def from_sources(cls, text: str | None = None, file: str | None = None) -> KeyRing | None:
        """Keys from comma- or newline-separated `text` and from a file (one per line, `#`
        comments), each `key` or `name:key`; None when neither gives any."""
        lines: list[str] = []
        if text:
            lines += text.replace(",", "\n").splitlines()
        if file:
            try:
                lines += Path(file).read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"cannot read the key file {file}: {exc}") from None
        keys = []
        for line in (ln.strip() for ln in lines):
            if not line or line.startswith("#"):
                continue
            name, sep, secret = line.partition(":")
            keys.append((name.strip(), secret.strip()) if sep else ("", name))
        return cls(keys) if keys else None

    def authenticate(self, authorization_header: str | None) -> str:
        """The caller id for an `authorization` header value ("Bearer <key>"); raises
        Unauthenticated when it is missing, malformed or names no known key."""
        scheme, _, secret = (authorization_header or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthenticated("missing credentials: send the metadata "
                                  "`authorization: Bearer <API key>`")
        presented = _digest(secret.strip())
        found = ""
        for digest, name in self._entries:  # every entry, whatever matched: no early exit
            if hmac.compare_digest(digest, presented):
                found = name
        if not found:
            raise Unauthenticated("the credential is not valid")
        return found


def current_caller() -> str:
    """Inside a handler behind AuthInterceptor: the caller id ("" elsewhere)."""
    return _CALLER.get()


def _metadata_value(metadata, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v
    return None


def _wrap(handler, handler_call_details, unary, streaming):
    """The method handler wrapped (wrap_handler); an unknown or exempt method's as it is."""
    if handler is None or handler_call_details.method.startswith(EXEMPT_PREFIXES):
        return handler
    return wrap_handler(handler, unary, streaming)


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every call but the exempt ones with `keyring`; with no keyring the caller
    id is the peer's address ("peer:ipv4:10.0.0.7:51234"). Goes after the error interceptor, which
    turns Unauthenticated into UNAUTHENTICATED."""

    def __init__(self, keyring: KeyRing | None):
        self._keyring = keyring

    def _caller(self, context: grpc.ServicerContext) -> str:
        if self._keyring is None:
            return f"peer:{context.peer()}"
        return self._keyring.authenticate(_metadata_value(context.invocation_metadata(), HEADER))

    def intercept_service(self, continuation, handler_call_details):
        return _wrap(continuation(handler_call_details), handler_call_details, self._unary, self._streaming)

    def _unary(self, fn):
        def handler(request, context):
            ctx = contextvars.copy_context()
            ctx.run(_CALLER.set, self._caller(context))
            return ctx.run(fn, request, context)

        return handler

    def _streaming(self, fn):
        def handler(request, context):
            ctx = contextvars.copy_context()
            ctx.run(_CALLER.set, self._caller(context))
            stream = ctx.run(fn, request, context)
            while True:  # each step of the handler's generator sees the caller too
                try:
                    item = ctx.run(next, stream)
                except StopIteration:
                    return
                yield item

        return handler


class AioAuthInterceptor(grpc.aio.ServerInterceptor):
    """AuthInterceptor for grpc.aio servers: each call runs in its own task, so the caller id set
    at its start is what `current_caller()` reads anywhere in it."""

    def __init__(self, keyring: KeyRing | None):
        self._check = AuthInterceptor(keyring)._caller

    async def intercept_service(self, continuation, handler_call_details):
        return _wrap(await continuation(handler_call_details), handler_call_details, self._unary,
                     self._streaming)

    def _unary(self, fn):
        async def handler(request, context):
            _CALLER.set(self._check(context))
            return await fn(request, context)

        return handler

    def _streaming(self, fn):
        if inspect.iscoroutinefunction(fn):  # a streaming handler that writes
            return self._unary(fn)

        async def handler(request, context):
            _CALLER.set(self._check(context))
            async for item in fn(request, context):
                yield item

        return handler


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: tuple | None
    credentials: object
    wait_for_ready: bool | None
    compression: object


class _Credential(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, secret: str):
        self._header = (HEADER, f"Bearer {secret}")

    def _details(self, d):
        metadata = tuple(d.metadata or ()) + (self._header,)
        return _CallDetails(d.method, d.timeout, metadata, d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def with_credential(channel: grpc.Channel, secret: str | None) -> grpc.Channel:
    """`channel` with `authorization: Bearer <secret>` on every call (unchanged for None)."""
    return channel if not secret else grpc.intercept_channel(channel, _Credential(secret))
