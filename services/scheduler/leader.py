"""Leader election among the schedulers of one request stream: a lease on one Redis key.

    taxiway:scheduler:leader = <scheduler id>, with a TTL (PX)

`acquire` sets the key when it is free (or already holds our id: a restart with the same id);
`renew` extends it only while it still holds our id and `release` deletes it only then. Both
compare and act in one Lua script, so a scheduler never renews or deletes a lock that another
one took after its own expired.

The lease is *valid* until `ttl - fence_margin` after the start of the last acquire or renew that
succeeded. Redis ran that command after it was sent, so the key cannot expire before `ttl` after
that moment: a holder that stops admitting once its lease is no longer valid has stopped
`fence_margin` before anybody else can take the lock (the margin covers an Admit already on the
wire and a blocked stream read). The clock is this process's monotonic clock.

    lock = LeaderLock(redis, "scheduler-a", ttl_s=5.0)
    if lock.acquire():        # every poll_s while standing by
        ...                   # lead: act only while lock.valid
        lock.renew()          # every renew_s; False: the lock is lost, stop at once
    lock.release()            # on a clean stop
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from services.common.streams import SCHEDULER_LEADER_KEY

# KEYS[1] = the lock, ARGV[1] = our id, ARGV[2] = ttl (ms). Each returns what the caller needs.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return holder
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaderLock:
    """One scheduler's side of the leader lock. Not thread-safe: one thread acquires and renews;
    any thread may read `valid` and `remaining_s`."""

    def __init__(self, r: redis.Redis, owner: str, *, ttl_s: float, key: str = SCHEDULER_LEADER_KEY,
                 fence_margin_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        margin = ttl_s / 4 if fence_margin_s is None else fence_margin_s
        if not 0 < margin < ttl_s:
            raise ValueError(f"fence_margin_s must be in (0, ttl_s={ttl_s}), got {margin}")
        self.owner = owner
        self.key = key
        self.ttl_s = ttl_s
        self.fence_margin_s = margin
        self.holder: str | None = None
        """The id that held the lock at the last acquire (None before the first, or if free)."""
        self._clock = clock
        self._valid_until = float("-inf")
        self._acquire = r.register_script(_ACQUIRE)
        self._renew = r.register_script(_RENEW)
        self._release = r.register_script(_RELEASE)
        self._redis = r

    @property
    def valid(self) -> bool:
        """True while this scheduler may act as the leader."""
        return self._clock() < self._valid_until

    @property
    def remaining_s(self) -> float:
        """Seconds of validity left (0 when not valid)."""
        return max(0.0, self._valid_until - self._clock())

    def acquire(self) -> bool:
        """Takes the lock if it is free or already ours. Raises on a Redis error."""
        start = self._clock()
        holder = self._acquire(keys=[self.key], args=[self.owner, self._ttl_ms()])
        self.holder = holder.decode() if isinstance(holder, bytes) else holder
        return self._extended(start, self.holder == self.owner)

    def renew(self) -> bool:
        """Extends the lock if it is still ours; False if it is not (lost: stop at once). Raises on
        a Redis error, which leaves the validity to run out."""
        start = self._clock()
        return self._extended(start, bool(self._renew(keys=[self.key],
                                                      args=[self.owner, self._ttl_ms()])))

    def release(self) -> bool:
        """Deletes the lock if it is ours; True if it was. Validity ends first, whatever Redis says."""
        self._valid_until = float("-inf")
        return bool(self._release(keys=[self.key], args=[self.owner]))

    def current_holder(self) -> str | None:
        value = self._redis.get(self.key)
        return value.decode() if value is not None else None

    def _extended(self, start: float, ok: bool) -> bool:
        self._valid_until = start + self.ttl_s - self.fence_margin_s if ok else float("-inf")
        return ok

    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))
