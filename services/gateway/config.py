"""The gateway tier's settings."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import (DRAIN_HELP, DRAIN_TIMEOUT_S, check_serving, metrics_port_option,
                                     option, require)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = option(50051, "gRPC port of the public API (0 picks a free one)")
    redis_url: str | None = option(None, "Redis URL, e.g. redis://127.0.0.1:6379/0 (also REDIS_URL)")
    tokenizer_address: str = option("127.0.0.1:50052", "the tokenizer tier: host:port, or "
                                                      "dns:///name:port to balance over replicas")
    gateway_id: str | None = option(None, "unique id; names its output stream (default: random)")
    request_timeout_s: float = option(600.0, "deadline of a request whose client gave none")
    max_workers: int = option(256, "gRPC worker threads; each streaming request holds one")
    metrics_port: int = metrics_port_option(9091)
    drain_timeout_s: float = option(DRAIN_TIMEOUT_S, DRAIN_HELP)

    def __post_init__(self) -> None:
        check_serving(self)
        require(self.request_timeout_s > 0, f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        require(bool(self.tokenizer_address), "tokenizer_address must not be empty")
