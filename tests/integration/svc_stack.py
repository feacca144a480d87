"""All four tiers in this process (each its own gRPC server on a free port), joined by a real
Redis: what the integration tests drive. Executors can also run as child processes, to be killed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import redis

from gpu_engine.config import EngineConfig
from services.common.auth import with_credential
from services.common.proto import Stub, pb
from services.executor.config import ExecutorConfig
from services.executor.service import ExecutorService
from services.gateway.config import GatewayConfig
from services.gateway.service import GatewayService
from services.scheduler.config import SchedulerConfig
from services.scheduler.service import SchedulerService
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.service import build as build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
FAST = {"heartbeat_interval_s": 0.2, "registration_ttl_s": 1.0}
INTERNAL_TOKEN = "test-internal-" + uuid.uuid4().hex
"""The internal credential every tier of every test stack shares."""


def internal_channel(address: str) -> grpc.Channel:
    """A channel to an internal tier that presents the tiers' credential."""
    return with_credential(grpc.insecure_channel(address), INTERNAL_TOKEN)


def real_engine(model: str | None, **config):
    """An LLMEngine on the CPU (float32) for `model` (None: the default model)."""
    from gpu_engine.config import EngineConfig
    from gpu_engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model=model, device="cpu", dtype="float32", **config))


def child_env() -> dict:
    """The environment of a tier run as a child process: no TAXIWAY_* of ours but the credential."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAXIWAY_") and k != "REDIS_URL"}
    env["TAXIWAY_INTERNAL_TOKEN"] = INTERNAL_TOKEN
    return env


def wait_for(predicate, timeout: float = 20.0, what: str = "condition", interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Stack:
    def __init__(self, redis_url: str, *, executors: int = 1, fake_step_s: float = 0.005,
                 fake_num_blocks: int = 256, max_waiting: int = 1024, real_model: str | None = None,
                 scheduler_id: str | None = None, tracer_providers: dict | None = None,
                 scheduler: bool = True, leader_ttl_s: float | None = None,
                 gateway_options: dict | None = None, redis_password: str | None = None,
                 tokenizer_address: str | None = None):
        self.redis_url = redis_url
        self.tokenizer_address = tokenizer_address
        """The gateway's tokenizer target (default: the stack's own in-process tokenizer)."""
        self.gateway_options = gateway_options or {"allow_anonymous": True}
        """GatewayConfig settings (default: no API keys)."""
        self.redis_auth = {"redis_password": redis_password} if redis_password else {}
        self.providers = tracer_providers or {}
        """role -> TracerProvider (e.g. telemetry.in_memory_tracing's) for that tier."""
        self.num_executors = executors
        self.fake_step_s = fake_step_s
        self.fake_num_blocks = fake_num_blocks
        self.max_waiting = max_waiting
        self.real_model = real_model
        self.scheduler_id = scheduler_id or f"sched-{uuid.uuid4().hex[:6]}"
        self.with_scheduler = scheduler
        """False: start() starts no scheduler (the test starts its own, e.g. add_scheduler)."""
        self.leader_ttl_s = leader_ttl_s
        """The schedulers' leader_ttl_s (None: the config's default)."""
        self.executors: list[ExecutorService] = []
        self.procs: list[subprocess.Popen] = []
        self.scheduler: SchedulerService | None = None
        self.schedulers: list[SchedulerService] = []
        """Schedulers from add_scheduler (stopped with the stack)."""

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Stack:
        redis.Redis.from_url(self.redis_url, password=self.redis_auth.get("redis_password")).flushdb()
        fake = self.real_model is None
        self.tokenizer = build_tokenizer(TokenizerConfig(port=0, metrics_port=0, fake_engine=fake,
                                                         model=self.real_model,
                                                         internal_token=INTERNAL_TOKEN),
                                         tracer_provider=self.providers.get("tokenizer"))
        for _ in range(self.num_executors):
            self.add_executor()
        if self.with_scheduler:
            self.start_scheduler()
        self.start_gateway(self.tokenizer_address or f"127.0.0.1:{self.tokenizer.port}")
        address, cert = f"127.0.0.1:{self.gateway.server.port}", self.gateway_options.get("tls_cert_file")
        if cert:  # a self-signed certificate is its own root
            creds = grpc.ssl_channel_credentials(root_certificates=Path(cert).read_bytes())
            self.channel = grpc.secure_channel(address, creds)
        else:
            self.channel = grpc.insecure_channel(address)
        self.stub = Stub(self.channel, "Gateway")
        self.wait_serving(self.channel)
        if self.with_scheduler:
            self.wait_executors(self.num_executors)
        return self

    def start_gateway(self, tokenizer_address: str) -> GatewayService:
        self.gateway = GatewayService(GatewayConfig(
            port=0, metrics_port=0, redis_url=self.redis_url, tokenizer_address=tokenizer_address,
            internal_token=INTERNAL_TOKEN, **self.redis_auth,
            **{"openai_port": -1, **self.gateway_options}),
            tracer_provider=self.providers.get("gateway")).start()
        return self.gateway

    def scheduler_config(self, scheduler_id: str, **overrides) -> SchedulerConfig:
        settings = {"port": 0, "metrics_port": 0, "redis_url": self.redis_url,
                    "internal_token": INTERNAL_TOKEN, **self.redis_auth,
                    "scheduler_id": scheduler_id, "max_waiting": self.max_waiting,
                    "heartbeat_timeout_s": 1.0, "discovery_interval_s": 0.1}
        if self.leader_ttl_s is not None:
            settings["leader_ttl_s"] = self.leader_ttl_s
        return SchedulerConfig(**{**settings, **overrides})

    def start_scheduler(self) -> SchedulerService:
        """(Re)starts the stack's own scheduler (`scheduler`, `scheduler_stub`, `state()`)."""
        self.scheduler = SchedulerService(self.scheduler_config(self.scheduler_id),
                                          tracer_provider=self.providers.get("scheduler")).start()
        self.scheduler_channel = internal_channel(f"127.0.0.1:{self.scheduler.server.port}")
        self.scheduler_stub = Stub(self.scheduler_channel, "Scheduler")
        return self.scheduler

    def stop_scheduler(self) -> None:
        self.scheduler.stop()
        self.scheduler_channel.close()

    def add_scheduler(self, scheduler_id: str, **overrides) -> SchedulerService:
        """One more scheduler in this process (it leads or stands by)."""
        s = SchedulerService(self.scheduler_config(scheduler_id, **overrides)).start()
        self.schedulers.append(s)
        return s

    def spawn_scheduler(self, scheduler_id: str) -> subprocess.Popen:
        """A scheduler in a child process (to kill -9)."""
        args = [sys.executable, "-m", "services.serve", "--role", "scheduler", "--port", "0",
                "--metrics-port", "0", "--scheduler-id", scheduler_id, "--redis-url", self.redis_url,
                "--heartbeat-timeout-s", "1.0", "--discovery-interval-s", "0.1"]
        if self.leader_ttl_s is not None:
            args += ["--leader-ttl-s", str(self.leader_ttl_s)]
        return self._spawn(args)

    def add_executor(self, engine=None, **overrides) -> ExecutorService:
        settings = dict(port=0, metrics_port=0, redis_url=self.redis_url,
                        executor_id=f"exec-{len(self.executors)}-{uuid.uuid4().hex[:6]}",
                        fake_engine=self.real_model is None and engine is None,
                        fake_step_s=self.fake_step_s, fake_num_blocks=self.fake_num_blocks,
                        engine=EngineConfig(model=self.real_model, device="cpu", dtype="float32"),
                        internal_token=INTERNAL_TOKEN, **self.redis_auth, **FAST)
        cfg = ExecutorConfig(**{**settings, **overrides})
        ex = ExecutorService(cfg, engine=engine, tracer_provider=self.providers.get("executor")).start()
        self.executors.append(ex)
        return ex

    def spawn_executor(self, executor_id: str, fake_step_s: float, *extra: str) -> subprocess.Popen:
        """An executor in a child process (to kill -9)."""
        args = [sys.executable, "-m", "services.serve", "--role", "executor",
                "--fake-engine", "--fake-step-s", str(fake_step_s), "--port", "0", "--metrics-port", "0",
                "--executor-id", executor_id, "--redis-url", self.redis_url,
                "--heartbeat-interval-s", "0.2", "--registration-ttl-s", "1.0", *extra]
        return self._spawn(args)

    def spawn_tokenizer(self, port: int) -> subprocess.Popen:
        """A fake-engine tokenizer replica in a child process (to kill -9)."""
        return self._spawn([sys.executable, "-m", "services.serve", "--role", "tokenizer",
                            "--fake-engine", "--port", str(port), "--metrics-port", "0"])

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        env = child_env()
        if self.redis_auth:
            env["TAXIWAY_REDIS_PASSWORD"] = self.redis_auth["redis_password"]
        proc = subprocess.Popen(args, cwd=ROOT, env=env)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.gateway.stop()
        self.channel.close()
        for s in self.schedulers:
            s.stop()
        if self.scheduler:
            self.stop_scheduler()
        for ex in self.executors:
            ex.stop()
        self.tokenizer.stop(0.5)

    # -- observation -------------------------------------------------------------------------------

    @staticmethod
    def wait_serving(channel, timeout: float = 20.0) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(channel)

        def serving():
            try:
                return stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        wait_for(serving, timeout, "the gateway to serve")

    def state(self):
        return self.scheduler_stub.GetState(pb.GetSchedulerStateRequest(), timeout=5)

    def wait_executors(self, n: int, timeout: float = 20.0) -> None:
        wait_for(lambda: sum(1 for e in self.state().executors if e.num_total_blocks) >= n,
                 timeout, f"{n} executors with state")

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Every executor has all its blocks free and no request."""
        def idle():
            s = self.state()
            return s.num_waiting == 0 and all(
                e.num_requests == 0 and e.num_free_blocks == e.num_total_blocks for e in s.executors)

        wait_for(idle, timeout, "the executors to be idle")

    # -- requests ------------------------------------------------------------------------------------

    def generate(self, text: str | None = None, *, timeout: float = 30.0, **sampling):
        req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
        if text is not None:
            req.text = text
        return list(self.stub.Generate(req, timeout=timeout))
