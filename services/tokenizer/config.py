"""The tokenizer tier's settings."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import (DRAIN_HELP, DRAIN_TIMEOUT_S, SecurityOptions, check_serving,
                                     metrics_port_option, option)


@dataclass(frozen=True)
class TokenizerConfig(SecurityOptions):
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = option(50052, "gRPC port (0 picks a free one)")
    model: str | None = option(None, "model folder (Hugging Face layout); default: SmolLM2-135M-Instruct")
    fake_engine: bool = option(False, "use the byte-level test tokenizer that matches the fake engine")
    metrics_port: int = metrics_port_option(9092)
    drain_timeout_s: float = option(DRAIN_TIMEOUT_S, DRAIN_HELP)

    def __post_init__(self) -> None:
        check_serving(self)
        self.check_security()
