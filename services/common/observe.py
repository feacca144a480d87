"""One tier instance's observability: its tracer (telemetry.py) and its metrics registry served on
its metrics port (metrics.py). Each service makes one at start and closes it at stop.

    obs = TierObservability("gateway", host="0.0.0.0", metrics_port=9091)
    span = obs.tracer.start_span("Generate", context=extract_context(metadata))
    metrics = GatewayMetrics(model_name, registry=obs.registry)   # once the model is known
    obs.close()                                                    # at stop: flushes spans

Tracing follows OTEL_EXPORTER_OTLP_ENDPOINT (off and near-free without it) unless a test passes
its own provider; the provider passed in stays the caller's to shut down.
"""

from __future__ import annotations

import threading
from pathlib import Path

from opentelemetry import trace

from services.common.metrics import new_registry, start_metrics_server
from services.common.telemetry import setup_tracing, shutdown_tracing

FLUSH_TIMEOUT_S = 3.0
SERVICE_NAMES = {role: f"taxiway-{role}" for role in ("gateway", "tokenizer", "scheduler", "executor")}


class TierObservability:
    def __init__(self, role: str, *, host: str, metrics_port: int,
                 tracer_provider: trace.TracerProvider | None = None):
        self._own_provider = tracer_provider is None
        self.provider = tracer_provider or setup_tracing(SERVICE_NAMES[role])
        self.tracer = self.provider.get_tracer(f"taxiway.{role}")
        self.registry = new_registry()
        self.server = start_metrics_server(self.registry, metrics_port, addr=host)

    @property
    def metrics_port(self) -> int:
        return self.server.port

    def close(self, flush_timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Stops the metrics endpoint and flushes queued spans, for at most flush_timeout_s: an
        unreachable collector must not hold the tier's exit (the exporter retries for ~10 s)."""
        self.server.close()
        if self._own_provider:
            flush = threading.Thread(target=shutdown_tracing, args=(self.provider,),
                                     name="trace-flush", daemon=True)
            flush.start()
            flush.join(flush_timeout_s)


def model_label(name: str) -> str:
    """The `model_name` label and `gen_ai.request.model`: a model folder's name, not its path."""
    return Path(name).name or name
