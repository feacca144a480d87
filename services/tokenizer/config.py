"""The tokenizer tier's settings."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import (DRAIN_HELP, DRAIN_TIMEOUT_S, check_drain, check_port, option,
                                     require)


@dataclass(frozen=True)
class TokenizerConfig:
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = option(50052, "gRPC port (0 picks a free one)")
    model: str | None = option(None, "model folder (Hugging Face layout); default: SmolLM2-135M-Instruct")
    fake_engine: bool = option(False, "use the byte-level test tokenizer that matches the fake engine")
    max_workers: int = option(256, "gRPC worker threads; each open Detokenize stream holds one")
    metrics_port: int = option(9092, "HTTP port of the Prometheus /metrics endpoint, on the same host "
                                      "(0 picks a free one)")
    drain_timeout_s: float = option(DRAIN_TIMEOUT_S, DRAIN_HELP)

    def __post_init__(self) -> None:
        check_port(self.port)
        check_port(self.metrics_port, "metrics_port")
        check_drain(self.drain_timeout_s)
        require(self.max_workers >= 1, f"max_workers must be >= 1, got {self.max_workers}")
