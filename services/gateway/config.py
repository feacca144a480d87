"""The gateway tier's settings."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import (DRAIN_HELP, DRAIN_TIMEOUT_S, RedisOptions, SecurityOptions,
                                     check_serving, metrics_port_option, option, require)

MIB = 1024 * 1024


@dataclass(frozen=True)
class GatewayConfig(RedisOptions, SecurityOptions):
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = option(50051, "gRPC port of the public API (0 picks a free one)")
    api_keys: str | None = option(None, "API keys clients send as `authorization: Bearer <key>`, "
                                        "comma-separated, each `key` or `name:key` (the name is "
                                        "the caller's id); give them through TAXIWAY_API_KEYS "
                                        "from a Secret, not on a command line")
    api_keys_file: str | None = option(None, "a file of API keys, one `key` or `name:key` per line")
    allow_anonymous: bool = option(False, "serve the public API without API keys: anyone who "
                                          "reaches the port may generate (`taxiway serve` with "
                                          "every tier turns it on when no key is given)")
    max_request_bytes: int = option(4 * MIB, "largest request message the public API takes; "
                                             "larger ones get RESOURCE_EXHAUSTED naming this limit "
                                             "(gRPC itself refuses messages over 4 times it)")
    redis_outage_s: float = option(10.0, "Redis unreachable this long: the requests in flight "
                                         "fail with UNAVAILABLE (and health is NOT_SERVING)")
    tokenizer_address: str = option("127.0.0.1:50052", "the tokenizer tier: host:port, or "
                                                      "dns:///name:port to balance over replicas")
    gateway_id: str | None = option(None, "unique id; names its output stream (default: random)")
    request_timeout_s: float = option(600.0, "deadline of a request whose client gave none")
    max_concurrent_requests: int = option(
        8192, "requests this replica holds at once (gRPC streams and OpenAI calls together); one "
              "more gets RESOURCE_EXHAUSTED (HTTP 429) naming this limit. The scheduler's "
              "max_waiting bounds the queue behind the executors")
    openai_port: int = option(8000, "HTTP port of the OpenAI-compatible API (/v1/completions, "
                                    "/v1/chat/completions, /v1/models, /health), on the same "
                                    "host and API keys as gRPC; 0 picks a free one, -1 turns it off")
    metrics_port: int = metrics_port_option(9091)
    drain_timeout_s: float = option(DRAIN_TIMEOUT_S, DRAIN_HELP)
    gateway_replicas: int = option(
        1, "`taxiway serve` (every tier): gateway processes sharing the gRPC and OpenAI ports "
           "(SO_REUSEPORT: the kernel spreads connections over them), each with its own output "
           "stream and metrics port (the first keeps metrics_port, the others pick free ones). One "
           "gateway process streams about 7,000 messages/s (docs/serving-performance.md); with "
           "--role gateway, scale the Deployment instead")
    reuse_port: bool = option(False, "listen with SO_REUSEPORT, sharing the ports with other gateway "
                                     "processes, and only once ready (`taxiway serve` sets it for "
                                     "its gateway replicas)")

    def __post_init__(self) -> None:
        check_serving(self)
        self.check_security()
        self.check_redis()
        require(self.max_request_bytes >= 1024,
                f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        require(self.redis_outage_s > 0, f"redis_outage_s must be > 0, got {self.redis_outage_s}")
        require(self.request_timeout_s > 0, f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        require(bool(self.tokenizer_address), "tokenizer_address must not be empty")
        require(self.max_concurrent_requests >= 1,
                f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}")
        require(self.openai_port == -1 or 0 <= self.openai_port <= 65535,
                f"openai_port must be in 0..65535 (0 picks a free one) or -1 (off), got "
                f"{self.openai_port!r}")
        require(self.openai_port in (0, -1) or self.openai_port != self.port,
                f"openai_port and port must differ, both are {self.port}")
        require(isinstance(self.gateway_replicas, int) and 1 <= self.gateway_replicas <= 64,
                f"gateway_replicas must be in 1..64, got {self.gateway_replicas!r}")
