"""The executor tier's settings: the service's own, and the engine's (EngineConfig, nested: every
engine setting is a `taxiway serve` flag, a TAXIWAY_* variable and a YAML key of the executor)."""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass

from gpu_engine.config import EngineConfig
from services.common.config import (DRAIN_HELP, DRAIN_TIMEOUT_S, RedisOptions, SecurityOptions,
                                     check_serving, metrics_port_option, option, require)
from services.executor.faults import parse_steps


@dataclass(frozen=True)
class ExecutorConfig(RedisOptions, SecurityOptions):
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = option(50054, "gRPC port (0 picks a free one)")
    advertise_address: str | None = option(None, "host:port the scheduler dials (default: host and "
                                                 "the bound port; this machine's name for 0.0.0.0)")
    executor_id: str | None = option(None, "unique id in the pool (default: <hostname>-<pid>)")
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig,
                                             metadata={"help": "the engine's settings"})
    fake_engine: bool = option(False, "run the deterministic fake engine instead of a model (tests)")
    fake_step_s: float = option(0.0, "fake engine: seconds each step takes")
    fake_num_blocks: int = option(256, "fake engine: KV blocks in its pool")
    heartbeat_interval_s: float = option(0.5, "seconds between state heartbeats and registration refreshes")
    registration_ttl_s: float = option(3.0, "seconds the Redis registration lives without a refresh")
    max_step_failures: int = option(3, "engine steps that may fail in a row (each fails its batch "
                                       "with INTERNAL) before the executor leaves the pool")
    fault_step_errors: str = option("", "fault injection for tests: engine steps that raise, "
                                        "counted from 1 (e.g. '3' or '3-5'); empty: none")
    max_workers: int = option(16, "gRPC worker threads")
    metrics_port: int = metrics_port_option(9094)
    drain_timeout_s: float = option(DRAIN_TIMEOUT_S, DRAIN_HELP)

    def __post_init__(self) -> None:
        check_serving(self)
        self.check_security()
        self.check_redis()
        require(self.heartbeat_interval_s > 0,
                f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        require(self.registration_ttl_s > 2 * self.heartbeat_interval_s,
                f"registration_ttl_s ({self.registration_ttl_s}) must exceed twice "
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) or registrations flicker")
        require(self.fake_num_blocks >= 1, f"fake_num_blocks must be >= 1, got {self.fake_num_blocks}")
        require(self.max_step_failures >= 1,
                f"max_step_failures must be >= 1, got {self.max_step_failures}")
        parse_steps(self.fault_step_errors)  # raises ValueError naming the bad part

    def resolved_id(self) -> str:
        return self.executor_id or f"{socket.gethostname()}-{os.getpid()}"

    def dial_address(self, bound_port: int) -> str:
        if self.advertise_address:
            return self.advertise_address
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "[::]") else self.host
        return f"{host}:{bound_port}"
