"""`taxiway serve`: run one tier (--role) or all four as separate processes on this machine.

Kept outside the `taxiway` package so that a tier process imports only what it needs (no torch
for the gateway, tokenizer and scheduler): `python -m services.serve --role gateway ...`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time

import yaml

from services.common.config import (ENV_PREFIX, ROLES, field_help, field_type, flat_dict, leaf_fields,
                                     load_yaml, parse_value, resolve)
from services.executor.config import ExecutorConfig
from services.gateway.config import GatewayConfig
from services.scheduler.config import SchedulerConfig
from services.tokenizer.config import TokenizerConfig

CONFIGS = {"gateway": GatewayConfig, "tokenizer": TokenizerConfig, "scheduler": SchedulerConfig,
           "executor": ExecutorConfig}
START_ORDER = ("tokenizer", "executor", "scheduler", "gateway")
READY_TIMEOUT_S = 900.0
DRAIN_REST_S = 10.0
"""`--role all` drain: how long the other tiers get once the gateway has drained."""


def _fields() -> dict[str, dict[str, tuple[type, dataclasses.Field]]]:
    """setting name -> {role: (owner class, field)}, over every role's config (the executor's
    engine settings included)."""
    out: dict[str, dict[str, tuple[type, dataclasses.Field]]] = {}
    for role, cls in CONFIGS.items():
        for owner, f in leaf_fields(cls):
            out.setdefault(f.name, {})[role] = (owner, f)
    return out


def setting_names() -> set[str]:
    """Every setting of every role (flags, TAXIWAY_* variables, YAML keys)."""
    return set(_fields())


DESCRIPTION = (
    "Run taxiway's tiers. With no arguments: all four as separate processes, the default model, "
    "an embedded Redis server, the gateway on 127.0.0.1:50051. Every flag is also an environment "
    f"variable {ENV_PREFIX}<FLAG> and a key of the --config YAML file; precedence: flags > "
    "environment > file > defaults.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", choices=[*ROLES, "all"], default=None,
                   help="which tier to run (default: all)")
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="YAML settings: flat keys, and per-role sections (gateway: {port: ...})")
    for name, per_role in _fields().items():
        owner, f = next(iter(per_role.values()))
        defaults = ", ".join(f"{r} {fl.default}" for r, (_, fl) in per_role.items())
        if len({repr(fl.default) for _, fl in per_role.values()}) == 1:
            defaults = str(f.default)
        kwargs = {"default": None, "help": f"{field_help(f)} (default: {defaults}; "
                                           f"roles: {', '.join(per_role)})"}
        tp = field_type(owner, name)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif tp in (dict, list):
            kwargs["type"] = json_value(tp)
            kwargs["metavar"] = "JSON"
        else:
            kwargs["type"] = tp
        p.add_argument(f"--{name.replace('_', '-')}", **kwargs)


def json_value(tp: type):
    """argparse type: a JSON object (or array) given on the command line."""
    def parse(text: str):
        return parse_value(text, tp)

    parse.__name__ = "JSON"
    return parse


def run(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    role = args.role or env.get(ENV_PREFIX + "ROLE") or "all"
    file = load_yaml(args.config or env.get(ENV_PREFIX + "CONFIG"))
    cli = {name: getattr(args, name) for name in _fields()}
    logging.basicConfig(level=env.get(ENV_PREFIX + "LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {role:9s} %(levelname)s %(name)s: %(message)s")
    known = set(_fields())
    if role != "all":
        from services.run import run_role

        config = resolve(CONFIGS[role], role, cli=cli, env=env, file=file, known=known)
        if getattr(config, "gateway_replicas", 1) > 1:
            print("taxiway serve: gateway_replicas is for --role all; with --role gateway, run more "
                  "replicas of it (the Deployment's replicas)", file=sys.stderr)
            return 2
        return run_role(role, config)
    return run_all(cli, env, file, known)


GATEWAY_ONLY = ("host", "port", "metrics_port")
"""With `--role all`, these flags and variables are the gateway's."""


def role_configs(cli: dict, env: dict, file: dict, known: set[str]) -> dict:
    """Each tier's config for `--role all`: --host/--port/--metrics-port (and TAXIWAY_HOST/PORT/
    METRICS_PORT) are the gateway's; the other tiers take theirs from the file or their defaults."""
    configs = {}
    for role in START_ORDER:
        c, e = dict(cli), dict(env)
        if role != "gateway":
            for name in GATEWAY_ONLY:
                c.pop(name, None), e.pop(ENV_PREFIX + name.upper(), None)
        configs[role] = resolve(CONFIGS[role], role, cli=c, env=e, file=file, known=known)
    tok = configs["tokenizer"]
    if tok.port == 0:
        from services.common.redis_server import free_port

        configs["tokenizer"] = tok = dataclasses.replace(tok, port=free_port(tok.host))
    if cli.get("tokenizer_address") is None and ENV_PREFIX + "TOKENIZER_ADDRESS" not in env:
        host = "127.0.0.1" if tok.host in ("0.0.0.0", "::") else tok.host
        configs["gateway"] = dataclasses.replace(configs["gateway"],
                                                 tokenizer_address=f"{host}:{tok.port}")
    return configs


def embedded_security(configs: dict) -> dict:
    """`--role all`: the tiers share a fresh internal credential unless one is given, and the
    gateway serves without API keys unless keys are given (the one place that is the default)."""
    tiers = list(configs.values())
    if not any(c.internal_token or c.internal_token_file or c.insecure_internal for c in tiers):
        token = secrets.token_urlsafe(32)
        configs = {r: dataclasses.replace(c, internal_token=token) for r, c in configs.items()}
    gw = configs["gateway"]
    if not (gw.api_keys or gw.api_keys_file or gw.allow_anonymous):
        configs["gateway"] = dataclasses.replace(gw, allow_anonymous=True)
    return configs


def run_all(cli: dict, env: dict, file: dict, known: set[str]) -> int:
    from services.common.redis_server import EmbeddedRedis
    from services.run import PARENT_ENV, Signals

    from services.common.lifetime import busy_ports, die_with_parent, run_dir

    configs = shared_gateway_ports(embedded_security(role_configs(cli, env, file, known)))
    busy = busy_ports(serve_ports(configs))
    if busy:
        verb = "is" if len(busy) == 1 else "are"
        print(f"taxiway serve: {', '.join(busy)} {verb} in use: is another `taxiway serve` running? Stop it, "
              "or pick other ports (--port, --openai-port, --metrics-port, the YAML file)",
              file=sys.stderr)
        return 1
    folder = run_dir()  # removed at the end; if this process is killed, by the next run
    redis = None
    if not configs["gateway"].redis_url:
        (folder / "redis").mkdir()
        redis = EmbeddedRedis(password=secrets.token_urlsafe(24), folder=str(folder / "redis"),
                              die_with_parent=True)
        configs = {r: dataclasses.replace(c, redis_url=redis.url, redis_password=redis.password)
                   if hasattr(c, "redis_url") else c for r, c in configs.items()}
        print(f"taxiway: embedded Redis at {redis.url} (with a password of its own)",
              file=sys.stderr)
    settings = {ENV_PREFIX + n.upper() for n in [*known, "role", "config"]} | {"REDIS_URL"}
    child_env = {k: v for k, v in env.items() if k not in settings}  # the files say it all
    child_env[PARENT_ENV] = str(os.getpid())
    procs: dict[str, subprocess.Popen] = {}
    signals = Signals()
    stop = signals.first
    try:
        for name, role, config in children(configs):
            path = folder / f"{name}.yaml"
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                yaml.safe_dump({role: flat_dict(config)}, f)
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "services.serve", "--role", role, "--config", str(path)],
                env=child_env, process_group=0, preexec_fn=die_with_parent(os.getpid()))
        gw = configs["gateway"]
        address = f"{'127.0.0.1' if gw.host in ('0.0.0.0', '::') else gw.host}:{gw.port}"
        if not _wait_ready(address, configs["gateway"], procs, stop):
            return 1 if not stop.is_set() else 0
        if gw.gateway_replicas > 1:
            print(f"taxiway: {gw.gateway_replicas} gateway processes share {address}"
                  + (f" and the OpenAI port {gw.openai_port}" if gw.openai_port != -1 else ""),
                  file=sys.stderr)
        print(f"taxiway is serving at {address}  (try: taxiway client --address {address} "
              f"\"What is the capital of France?\"; Ctrl-C stops)", flush=True)
        while not stop.wait(0.5):
            dead = [r for r, p in procs.items() if p.poll() is not None]
            if dead:
                print(f"taxiway: the {dead[0]} tier exited ({procs[dead[0]].returncode}); "
                      "stopping", file=sys.stderr)
                return 1
        _drain_children(procs, configs["gateway"].drain_timeout_s, signals.second)
        return 0
    finally:
        _stop_children(procs)
        if redis is not None:
            redis.stop()
        shutil.rmtree(folder, ignore_errors=True)
        print("taxiway: stopped", file=sys.stderr)


def shared_gateway_ports(configs: dict) -> dict:
    """With gateway_replicas > 1 the gateways share their gRPC and OpenAI ports (reuse_port); a
    port given as 0 is picked here, once for all of them."""
    from services.common.redis_server import free_port

    gw = configs["gateway"]
    if gw.gateway_replicas == 1:
        return configs
    pick = {name: free_port(gw.host) for name in ("port", "openai_port") if getattr(gw, name) == 0}
    return {**configs, "gateway": dataclasses.replace(gw, reuse_port=True, **pick)}


def children(configs: dict) -> list[tuple[str, str, object]]:
    """(process name, role, config) of every child, in start order: with gateway_replicas N,
    N gateways ("gateway", "gateway-2", ...), each with its own id and metrics port (the first
    keeps the configured ones)."""
    out = []
    for role in START_ORDER:
        config = configs[role]
        n = getattr(config, "gateway_replicas", 1)
        for i in range(n):
            own = {"gateway_replicas": 1} if n > 1 else {}  # each child is one of them
            if i:
                own["metrics_port"] = 0
            if i and config.gateway_id:
                own["gateway_id"] = f"{config.gateway_id}-{i + 1}"
            out.append((role if i == 0 else f"{role}-{i + 1}", role, dataclasses.replace(config, **own)))
    return out


def serve_ports(configs: dict) -> list[tuple[str, str, int]]:
    """Every port `--role all` listens on: (what, host, port)."""
    out = []
    for role, c in configs.items():
        out += [(f"{role} port", c.host, c.port), (f"{role} metrics_port", c.host, c.metrics_port)]
    gw = configs["gateway"]
    out.append(("gateway openai_port", gw.host, gw.openai_port))
    return out


def _wait_ready(address: str, gateway, procs: dict, stop) -> bool:
    """True once the gateway is SERVING and an executor has joined (its model is loaded)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common import streams
    from services.common.server import channel as make_channel

    redis = streams.connect(gateway.redis_url, **gateway.redis_options())
    deadline = time.monotonic() + READY_TIMEOUT_S
    # with TLS, its own certificate is the root: right for the self-signed ones a machine uses
    with make_channel(address, ca_file=gateway.tls_cert_file) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and not stop.is_set():
            dead = [r for r, p in procs.items() if p.poll() is not None]
            if dead:
                print(f"taxiway: the {dead[0]} tier exited during start-up", file=sys.stderr)
                return False
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING and streams.list_executors(redis):
                    return True
            except grpc.RpcError:
                pass
            stop.wait(0.3)
    if not stop.is_set():
        print(f"taxiway: not ready within {READY_TIMEOUT_S:.0f}s (gateway serving and an executor "
              "joined)", file=sys.stderr)
    return False


def _drain_children(procs: dict, grace_s: float, interrupted) -> None:
    """Gateway first: it stops taking requests and finishes its streams (within its own
    drain_timeout_s) while the other tiers still serve them; then the others, which have nothing
    left to run, drain and exit together. A second signal cuts it short (_stop_children then
    signals the children again, which makes them stop at once)."""
    from services.common.drain import wait_until

    print(f"taxiway: draining (up to {grace_s:.0f}s; Ctrl-C again to stop at once)",
          file=sys.stderr)
    budget = grace_s + 5.0  # + the gateway's own stop
    gateways = [name for name in procs if _role(name) == "gateway"]
    for group in (gateways, [r for r in reversed(START_ORDER) if r != "gateway"]):
        alive = [procs[r] for r in group if r in procs and procs[r].poll() is None]
        for p in alive:
            p.terminate()
        if not wait_until(lambda: all(p.poll() is not None for p in alive), budget, interrupted):
            return
        budget = DRAIN_REST_S


def _role(name: str) -> str:
    """A child's role from its process name ("gateway-2" is a gateway)."""
    return name.split("-")[0]


def _stop_children(procs: dict) -> None:
    order = {role: i for i, role in enumerate(reversed(START_ORDER))}  # gateways first: no new requests
    for name in sorted(procs, key=lambda n: order[_role(n)]):
        p = procs[name]
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main(argv: list[str] | None = None) -> int:
    """`python -m services.serve ...`: the same as `taxiway serve ...`."""
    parser = argparse.ArgumentParser(prog="taxiway serve", description=DESCRIPTION)
    add_arguments(parser)
    return int(run(parser.parse_args(sys.argv[1:] if argv is None else argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
