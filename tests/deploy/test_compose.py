"""compose.yaml, the Dockerfile and .dockerignore: structure always; `docker compose config` (or
Debian's `docker-compose config`) where one is installed. Neither needs a Docker engine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
PROFILES = ("cpu", "gpu", "tracing")
TIER_PORTS = {"gateway": 50051, "tokenizer": 50052, "scheduler": 50053, "executor": 50054,
              "executor-gpu": 50054}
SECRETS = {"TAXIWAY_API_KEYS": "alice:sk-test", "TAXIWAY_INTERNAL_TOKEN": "internal-test",
           "TAXIWAY_REDIS_PASSWORD": "redis-test"}
"""What a user puts in .env; compose refuses to run without it."""


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) if it answers, else `docker-compose`, else None."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def run_config(path: Path, secrets: dict | None = None) -> subprocess.CompletedProcess:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    profiles = [arg for p in PROFILES for arg in ("--profile", p)]
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(command + ["-f", str(path)] + profiles + ["config"],
                          capture_output=True, text=True, timeout=60, cwd=path.parent,
                          env={**env, **(SECRETS if secrets is None else secrets)})


@pytest.fixture(scope="module")
def services() -> dict:
    with open(COMPOSE) as f:
        return yaml.safe_load(f)["services"]


def _seconds(duration: str) -> float:
    """A compose duration ("130s", or "2m10s" as `config` prints it) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"([0-9.]+)(ms|h|m|s)", str(duration))
    assert parts, duration
    return sum(float(n) * units[u] for n, u in parts)


def secret(value: str, name: str, rendered: bool) -> bool:
    """The value compose gives `name`: the secret itself once rendered, else a reference to the
    shell's variable that compose refuses to go without."""
    return value == SECRETS[name] if rendered else value.startswith("${" + name + ":?")


def check_services(services: dict, rendered: bool = False) -> None:
    """The properties compose.yaml promises, on its own text or on what `config` printed."""
    assert set(services) == {"redis", *TIER_PORTS, "jaeger"}
    for name, svc in services.items():
        assert "container_name" not in svc, f"{name}: a fixed name breaks --scale"
        if name not in ("gateway", "jaeger"):
            assert "ports" not in svc, f"{name}: a fixed host port breaks --scale"
        if name != "jaeger":
            assert "healthcheck" in svc, name
        for dep, how in svc.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", (name, dep)
            assert "healthcheck" in services[dep] and not services[dep].get("profiles"), (name, dep)
    for tier, port in TIER_PORTS.items():
        svc = services[tier]
        assert svc["environment"]["TAXIWAY_ROLE"] == tier.split("-")[0]
        assert svc["environment"]["TAXIWAY_REDIS_URL"] == "redis://redis:6379/0"
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" in svc["environment"]
        assert svc["healthcheck"]["test"] == ["CMD", "python", "-m", "services.common.healthprobe",
                                              f"127.0.0.1:{port}"]
        assert any(v.split(":")[1].startswith("/var/cache/taxiway") for v in _volume_strings(svc))
        # the drain ends before Docker's SIGKILL, with 5 s left for the rest of the shutdown
        drain = float(svc["environment"]["TAXIWAY_DRAIN_TIMEOUT_S"])
        assert drain + 5 <= _seconds(svc["stop_grace_period"]), tier
        env = svc["environment"]
        for name in ("TAXIWAY_INTERNAL_TOKEN", "TAXIWAY_REDIS_PASSWORD"):
            assert secret(env[name], name, rendered), (tier, name)
        # reflection only on the public gateway
        assert env.get("TAXIWAY_REFLECTION") == (None if tier == "gateway" else "false"), tier
    assert secret(services["gateway"]["environment"]["TAXIWAY_API_KEYS"], "TAXIWAY_API_KEYS", rendered)
    redis = services["redis"]
    script = " ".join(redis["command"])
    assert "--appendonly yes" in script and "--appendfsync everysec" in script
    assert 'requirepass "$$REDIS_PASSWORD"' in script or 'requirepass "$REDIS_PASSWORD"' in script
    assert secret(redis["environment"]["REDIS_PASSWORD"], "TAXIWAY_REDIS_PASSWORD", rendered)
    assert any(v.endswith(":/data") or ":/data:" in v for v in _volume_strings(redis))
    assert "ports" not in redis
    assert services["gateway"]["environment"]["TAXIWAY_TOKENIZER_ADDRESS"] == "dns:///tokenizer:50052"
    assert set(services["gateway"]["depends_on"]) == {"redis", "tokenizer", "scheduler"}
    assert services["executor"]["profiles"] == ["cpu"]
    assert services["executor"]["environment"]["TAXIWAY_DEVICE"] == "cpu"
    gpu = services["executor-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["environment"]["TAXIWAY_DEVICE"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    assert services["jaeger"]["profiles"] == ["tracing"]
    assert "4317" in [str(p) for p in services["jaeger"]["expose"]]


def _volume_strings(svc: dict) -> list[str]:
    # `config` may print the long syntax; reduce both to "source:target".
    return [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in svc.get("volumes", [])]


def test_compose_file_structure(services):
    check_services(services)


def test_compose_config_validates():
    out = run_config(COMPOSE)
    assert out.returncode == 0, out.stderr
    # anchors, merges and the secrets resolved by compose
    check_services(yaml.safe_load(out.stdout)["services"], rendered=True)


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_run_without_a_secret(missing):
    out = run_config(COMPOSE, {k: v for k, v in SECRETS.items() if k != missing})
    assert out.returncode != 0 and f"set {missing}" in out.stderr


@pytest.mark.parametrize(
    "breakage",
    ["    helthcheck: {}\n", "    depends_on:\n      nowhere:\n        condition: service_healthy\n"],
    ids=["unknown-key", "unknown-dependency"],
)
def test_compose_config_rejects_broken_file(tmp_path, breakage):
    text = COMPOSE.read_text().replace("  redis:\n    image: redis:7\n",
                                       "  redis:\n    image: redis:7\n" + breakage, 1)
    assert text != COMPOSE.read_text()
    (tmp_path / "compose.yaml").write_text(text)
    (tmp_path / "deploy" / "docker").mkdir(parents=True)
    (tmp_path / "deploy" / "docker" / "Dockerfile").write_text(DOCKERFILE.read_text())
    out = run_config(tmp_path / "compose.yaml")
    assert out.returncode != 0


# --- Dockerfile and .dockerignore ---------------------------------------------------------------

def stages() -> dict[str, list[str]]:
    """Instructions of each build stage, by stage name, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    result, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            current = line.split()[-1]
            result[current] = []
        elif current:
            result[current].append(line)
    return result


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_dockerfile_final_stages(target):
    lines = stages()[target]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    (health,) = [line for line in lines if line.startswith("HEALTHCHECK ")]
    assert '"services.common.healthprobe"' in health
    assert any(line.startswith("ENTRYPOINT ") and '"taxiway", "serve"' in line for line in lines)
    assert any(line.startswith("COPY --from=") for line in lines)


def test_dockerfile_dependency_step_reads_pyproject():
    """Both dependency layers run this very `python -c` on pyproject.toml: it must list the deps."""
    lines = {line.strip() for line in DOCKERFILE.read_text().splitlines() if "tomllib.load" in line}
    (line,) = lines  # the cpu and gpu builders share it
    program = re.search(r'python -c "(.*)"', line).group(1)
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert out.stdout.split() == tomllib.load(f)["project"]["dependencies"]
    assert any(d.startswith("grpcio-health-checking") for d in out.stdout.split())


def test_dockerignore_keeps_what_the_build_needs():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in ("pyproject.toml", "README.md", "services", "taxiway", "gpu_engine", "taxiway_kernels",
                   "protos"):
        assert needed not in ignored
    assert {".git", "tests"} <= ignored


def test_hadolint_if_installed():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_healthprobe_runs_as_a_module():
    """What HEALTHCHECK runs: nothing listens on the port, so exit status 1, not a crash."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "services.common.healthprobe", f"127.0.0.1:{port}",
                          "--timeout", "0.5"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 1, out.stderr
    assert "UNREACHABLE" in out.stdout
