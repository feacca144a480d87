"""The Redis keys and streams that join the tiers (entry formats: protos/taxiway/v1/streams.proto).

    taxiway:requests            gateways XADD QueueEntry; schedulers read it as consumer group
                                "taxiway-schedulers" and XACK an entry once its request is over
    taxiway:out:<gateway_id>    executors XADD one OutputBatch per step per gateway; the scheduler
                                XADDs notices (rejections, executor lost); the gateway XREADs it
    taxiway:executor:<id>       an executor's registration (JSON: id, address, model), with a TTL
                                that its heartbeat refreshes
    taxiway:scheduler:leader    the id of the scheduler that admits (services/scheduler/leader.py),
                                with a TTL that the leader renews
"""

from __future__ import annotations

import json

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

REQUESTS_STREAM = "taxiway:requests"
SCHEDULER_GROUP = "taxiway-schedulers"
EXECUTOR_PREFIX = "taxiway:executor:"
SCHEDULER_LEADER_KEY = "taxiway:scheduler:leader"
FIELD = b"m"
OUT_STREAM_MAXLEN = 100_000
"""Approximate cap of each output stream (entries): a gateway that died leaves a bounded stream."""
OUT_STREAM_TTL_S = 3600
"""An output stream nobody wrote to for this long is deleted by Redis."""


def out_stream(gateway_id: str) -> str:
    return f"taxiway:out:{gateway_id}"


def connect(url: str, timeout_s: float | None = None, retries: int | None = None,
            **auth) -> redis.Redis:
    """A client. timeout_s bounds each command's wait for its reply (None: no bound). A command
    that meets a dropped connection (a Redis restart, a failover) is retried on a new connection,
    with exponential backoff from 50 ms to 1 s, `retries` times (None: 6, about 3 s in all; 0 or 1
    for connections that must fail fast, the leader lock's). auth: username, password,
    ssl_ca_certs (RedisOptions.redis_options())."""
    backoff = NoBackoff() if retries is not None and retries <= 1 else ExponentialBackoff(1.0, 0.05)
    retry = Retry(backoff, 6 if retries is None else retries)
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=timeout_s,
                                health_check_interval=30, retry=retry, **auth)


ASYNC_MAX_CONNECTIONS = 64
"""Connections of one asyncio client: thousands of requests' XADDs share them (each waits for a
free one) instead of opening one each, which would exhaust Redis's maxclients."""


def connect_async(url: str, timeout_s: float | None = None,
                  max_connections: int = ASYNC_MAX_CONNECTIONS, **auth):
    """connect() for asyncio (redis.asyncio.Redis), with the same retries on a dropped connection
    and a bounded pool of connections."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry as AsyncRetry

    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=None, socket_connect_timeout=5,
        socket_timeout=timeout_s, health_check_interval=30,
        retry=AsyncRetry(ExponentialBackoff(1.0, 0.05), 6), **auth)
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes its connections


def server_id(r: redis.Redis) -> str:
    """The Redis server's run id: it changes when the server restarts (or a replica takes over)."""
    return str(r.info("server")["run_id"])


def ensure_group(r: redis.Redis) -> None:
    """Creates the schedulers' consumer group (and the stream) unless it exists: at start, and
    again when Redis answers NOGROUP (it restarted empty). From id 0: entries that gateways added
    before the group existed are read too."""
    try:
        r.xgroup_create(REQUESTS_STREAM, SCHEDULER_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc)


_FORGET_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""


def claim_pending(r: redis.Redis, consumer: str, min_idle_ms: int, *, forget: bool = False,
                  batch: int = 1000) -> list[tuple[bytes, dict | None]]:
    """Moves to `consumer` the request entries that every other consumer of the schedulers' group
    read, did not acknowledge, and left idle at least min_idle_ms; returns them as XREADGROUP
    does (id, fields), in id order. forget: then deletes those consumers from the group, each only if nothing
    is pending for it any more (atomically, so a late read of theirs is never dropped)."""
    claimed: list[tuple[bytes, dict | None]] = []
    forget_script = r.register_script(_FORGET_CONSUMER) if forget else None
    for info in r.xinfo_consumers(REQUESTS_STREAM, SCHEDULER_GROUP):
        name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
        if name == consumer:
            continue
        start = "-"
        while info["pending"]:  # pages of its pending entries, in id order
            pending = r.xpending_range(REQUESTS_STREAM, SCHEDULER_GROUP, start, "+", batch,
                                       consumername=name, idle=min_idle_ms)
            ids = [p["message_id"] for p in pending]
            if ids:
                claimed += r.xclaim(REQUESTS_STREAM, SCHEDULER_GROUP, consumer, min_idle_ms, ids)
            if len(ids) < batch:
                break
            start = "(" + (ids[-1].decode() if isinstance(ids[-1], bytes) else ids[-1])
        if forget_script is not None:
            forget_script(keys=[REQUESTS_STREAM], args=[SCHEDULER_GROUP, name])
    return sorted(claimed, key=lambda e: tuple(int(x) for x in e[0].split(b"-")))


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
