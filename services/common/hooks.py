"""Where tracing and metrics hook in. Each tier calls `span()` around its one unit of work (the
gateway's request, the tokenizer's RPC, the scheduler's event, the executor's step) and `record()`
for its figures; both do nothing until they are wired, here, to the observability libraries
(telemetry.py: OpenTelemetry; metrics.py: Prometheus; docs/observability.md).

Trace context travels as a W3C `traceparent` string inside gRPC metadata and in the Redis entries
(EngineRequest.traceparent).
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Iterator, Sequence

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def traceparent_from_metadata(metadata: Sequence[tuple[str, str]] | None) -> str:
    """The caller's valid `traceparent`, or a new one starting a trace."""
    for key, value in metadata or ():
        if key.lower() == "traceparent" and isinstance(value, str) and _TRACEPARENT.match(value):
            return value
    return new_traceparent()


@contextlib.contextmanager
def span(name: str, traceparent: str = "", **attributes: object) -> Iterator[None]:
    """A span named `name`, child of `traceparent` (hook: no-op for now)."""
    yield


def record(metric: str, value: float = 1.0, **labels: str) -> None:
    """Adds `value` to a counter or histogram (hook: no-op for now)."""
