"""The scheduler tier's settings."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from services.common.config import (DRAIN_HELP, DRAIN_TIMEOUT_S, RedisOptions, SecurityOptions,
                                     check_serving, metrics_port_option, option, require)


@dataclass(frozen=True)
class SchedulerConfig(RedisOptions, SecurityOptions):
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = option(50053, "gRPC port (0 picks a free one)")
    scheduler_id: str | None = option(None, "unique id: its name in the leader lock and its consumer "
                                            "name in the request stream's group; a restarted "
                                            "scheduler with the same id re-reads what it had not "
                                            "acknowledged (default: <hostname>-<pid>)")
    leader_ttl_s: float = option(5.0, "life of the leader lock: the leader renews it every third of "
                                      "this and stops admitting when a quarter of it is left "
                                      "unrenewed; a standby takes over within about this long after "
                                      "the leader dies")
    max_waiting: int = option(1024, "most requests waiting for admission; past it RESOURCE_EXHAUSTED")
    max_prefill_backlog_tokens: int = option(16384, "admit to an executor only while its prompt "
                                                    "tokens not yet prefilled stay under this")
    kv_watermark: float = option(0.01, "share of an executor's KV blocks kept free at admission")
    heartbeat_timeout_s: float = option(3.0, "an executor silent this long is declared lost")
    discovery_interval_s: float = option(0.5, "seconds between looks for new executors in Redis")
    claim_idle_s: float = option(30.0, "the leader also takes over request entries another "
                                       "scheduler read later than its lock and left unacknowledged "
                                       "this long")
    max_workers: int = option(8, "gRPC worker threads")
    metrics_port: int = metrics_port_option(9093)
    drain_timeout_s: float = option(DRAIN_TIMEOUT_S, DRAIN_HELP)

    def __post_init__(self) -> None:
        check_serving(self)
        self.check_security()
        self.check_redis()
        require(self.max_waiting >= 1, f"max_waiting must be >= 1, got {self.max_waiting}")
        require(0.0 <= self.kv_watermark < 1.0, f"kv_watermark must be in [0, 1), got {self.kv_watermark}")
        require(self.heartbeat_timeout_s > 0, f"heartbeat_timeout_s must be > 0, got {self.heartbeat_timeout_s}")
        require(self.discovery_interval_s > 0,
                f"discovery_interval_s must be > 0, got {self.discovery_interval_s}")
        require(self.leader_ttl_s >= 0.5,
                f"leader_ttl_s must be >= 0.5 seconds, got {self.leader_ttl_s}")
        require(self.claim_idle_s > 0, f"claim_idle_s must be > 0, got {self.claim_idle_s}")

    def resolved_id(self) -> str:
        return self.scheduler_id or f"{socket.gethostname()}-{os.getpid()}"
