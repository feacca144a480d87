"""The Redis keys and streams that join the tiers (entry formats: protos/taxiway/v1/streams.proto).

    taxiway:requests            gateways XADD QueueEntry; schedulers read it as consumer group
                                "taxiway-schedulers" and XACK an entry once its request is over
    taxiway:out:<gateway_id>    executors XADD one OutputBatch per step per gateway; the scheduler
                                XADDs notices (rejections, executor lost); the gateway XREADs it
    taxiway:executor:<id>       an executor's registration (JSON: id, address, model), with a TTL
                                that its heartbeat refreshes
"""

from __future__ import annotations

import json

import redis

REQUESTS_STREAM = "taxiway:requests"
SCHEDULER_GROUP = "taxiway-schedulers"
EXECUTOR_PREFIX = "taxiway:executor:"
FIELD = b"m"
OUT_STREAM_MAXLEN = 100_000
"""Approximate cap of each output stream (entries): a gateway that died leaves a bounded stream."""
OUT_STREAM_TTL_S = 3600
"""An output stream nobody wrote to for this long is deleted by Redis."""


def out_stream(gateway_id: str) -> str:
    return f"taxiway:out:{gateway_id}"


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)


def ensure_group(r: redis.Redis) -> None:
    try:
        r.xgroup_create(REQUESTS_STREAM, SCHEDULER_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def register_executor(r: redis.Redis, executor_id: str, info: dict, ttl_s: float) -> None:
    r.set(EXECUTOR_PREFIX + executor_id, json.dumps(info), px=int(ttl_s * 1000))


def unregister_executor(r: redis.Redis, executor_id: str) -> None:
    r.delete(EXECUTOR_PREFIX + executor_id)


def list_executors(r: redis.Redis) -> dict[str, dict]:
    """{executor_id: registration} of every live executor."""
    keys = list(r.scan_iter(match=EXECUTOR_PREFIX + "*", count=1000))
    found = {}
    for value in r.mget(keys) if keys else []:
        if value is not None:  # expired between SCAN and MGET
            info = json.loads(value)
            found[info["executor_id"]] = info
    return found
