"""A counting semaphore on Redis with a bounded FIFO waiting line (protocol step 2: admission).

Each operation is one atomic Lua script that reads the server clock (`TIME`), so gateways with
skewed clocks agree. Keys (all under the hash tag `{name}`, see `Keys.sem_*`):

- holders: sorted set permit id -> lease expiry (ms); expired holders are purged on every call.
- waiters: sorted set permit id -> FIFO ticket (from an INCR counter).
- waiter heartbeats: sorted set permit id -> heartbeat expiry (ms); a waiter that stops asking
  (its gateway died) is dropped on every call and those behind it move up.

Fairness: a waiter may take a slot when its rank in the line is below `capacity - held`, so a
slot that frees up is kept for the head of the line even before the head asks again. A
newcomer is treated as if it had joined at the end: it takes a slot at once only when every
waiter ahead of it also fits.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.replica_wait import eval_durably
from chatstream_cluster.shared.waits import wait_set

# KEYS: holders, waiters, waiter heartbeats, ticket. Defines `now` (ms, server clock).
_PURGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for i = 1, #gone, 1000 do  -- unpack() has a stack limit: drop vanished waiters in chunks
  local last = math.min(i + 999, #gone)
  redis.call('ZREM', KEYS[2], unpack(gone, i, last))
  redis.call('ZREM', KEYS[3], unpack(gone, i, last))
end
"""

# ARGV: permit id, capacity, max waiters, lease ms, waiter ttl ms.
# Returns {acquired 0/1, position or -1, rejected 0/1}.
_ACQUIRE = """
local id = ARGV[1]
local capacity = tonumber(ARGV[2])
local max_waiters = tonumber(ARGV[3])
local lease_ms = tonumber(ARGV[4])
local waiter_ttl_ms = tonumber(ARGV[5])
if redis.call('ZSCORE', KEYS[1], id) then
  redis.call('ZADD', KEYS[1], now + lease_ms, id)
  return {1, -1, 0}
end
local free = capacity - redis.call('ZCARD', KEYS[1])
local rank = redis.call('ZRANK', KEYS[2], id)
local queued = rank ~= false
if not queued then
  rank = redis.call('ZCARD', KEYS[2])
end
if rank < free then
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZADD', KEYS[1], now + lease_ms, id)
  return {1, -1, 0}
end
if not queued then
  if rank >= max_waiters then
    return {0, -1, 1}
  end
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), id)
end
redis.call('ZADD', KEYS[3], now + waiter_ttl_ms, id)
return {0, rank, 0}
"""

# ARGV: permit id. Returns 1 when it was held. Also takes it out of the line.
_RELEASE = """
local held = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return held
"""

# ARGV: permit id.
_LEAVE = """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 0
"""

# ARGV: lease ms, permit ids... Extends the leases of those still held; returns the others.
_REFRESH = """
local expiry = now + tonumber(ARGV[1])
local lapsed = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], expiry, ARGV[i])
  else
    table.insert(lapsed, ARGV[i])
  end
end
return lapsed
"""

# Returns {held, waiting}.
_COUNTS = """
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])}
"""

# ARGV: 1 (holders, by lease expiry) or 2 (waiters, FIFO). Returns the permit ids.
_LIST = """
return redis.call('ZRANGE', KEYS[tonumber(ARGV[1])], 0, -1)
"""


# The scripts as registered: each purges first, then does its one thing.
ACQUIRE_LUA = _PURGE + _ACQUIRE
RELEASE_LUA = _PURGE + _RELEASE
LEAVE_LUA = _PURGE + _LEAVE
REFRESH_LUA = _PURGE + _REFRESH
COUNTS_LUA = _PURGE + _COUNTS
LIST_LUA = _PURGE + _LIST


class SemaphoreTimeout(Exception):
    """A permit was not granted within the timeout; the waiter has left the line."""


@dataclass(frozen=True)
class AcquireResult:
    acquired: bool  # True: holds a permit now
    position: int | None  # 0-based place in the line while waiting, else None
    rejected: bool  # True: the line is full, not queued


class RedisSemaphore:
    """Counting semaphore `name`; capacity and line bound are passed per call (they may change)."""

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        name: str = "global",
        *,
        lease_s: float = 15.0,
        waiter_ttl_s: float = 5.0,
    ) -> None:
        self.redis = redis
        self.name = name
        self.lease_ms = max(1, int(lease_s * 1000))
        self.waiter_ttl_ms = max(1, int(waiter_ttl_s * 1000))
        self._beat_s = waiter_ttl_s / 3
        self._keys = [
            keys.sem_holders(name),
            keys.sem_waiters(name),
            keys.sem_waiter_heartbeats(name),
            keys.sem_ticket(name),
        ]
        self._acquire = redis.register_script(ACQUIRE_LUA)
        self._release = redis.register_script(RELEASE_LUA)
        self._leave = redis.register_script(LEAVE_LUA)
        self._refresh = redis.register_script(REFRESH_LUA)
        self._counts = redis.register_script(COUNTS_LUA)
        self._list = redis.register_script(LIST_LUA)
        self._wake = asyncio.Event()  # set (and replaced) by release() to wake local waiters

    async def try_acquire(self, permit_id: str, capacity: int, max_waiters: int) -> AcquireResult:
        """One idempotent attempt: hold (or refresh), join/stay in line, or be rejected.

        With Sentinel it is followed by WAIT, so a grant survives a failover
        (shared/replica_wait.py)."""
        args = [permit_id, int(capacity), int(max_waiters), self.lease_ms, self.waiter_ttl_ms]
        acquired, position, rejected = await eval_durably(
            self.redis, self._acquire, self._keys, args
        )
        if acquired:
            return AcquireResult(True, None, False)
        if rejected:
            return AcquireResult(False, None, True)
        return AcquireResult(False, int(position), False)

    async def acquire(
        self,
        permit_id: str,
        capacity: int | Callable[[], int],
        max_waiters: int,
        timeout: float,  # noqa: ASYNC109 - a deadline for the whole wait, part of the API
        *,
        poll_interval: float = 0.1,
        on_position: Callable[[int], Any] | None = None,
    ) -> AcquireResult:
        """Wait in line until a permit is held (or the line is full: `rejected`).

        `capacity` may be a callable, read again on every try: a cap derived from the live
        workers then applies to requests already waiting, not only to newcomers.

        Raises SemaphoreTimeout after `timeout` seconds, having left the line. On cancellation
        (client gone) the permit id leaves the line (and gives up a permit granted by a call
        still in flight) before the CancelledError propagates.
        """
        deadline = time.monotonic() + timeout
        last_position: int | None = None
        try:
            while True:
                cap = capacity() if callable(capacity) else capacity
                result = await self.try_acquire(permit_id, cap, max_waiters)
                if result.acquired or result.rejected:
                    return result
                if on_position is not None and result.position != last_position:
                    last_position = result.position
                    maybe = on_position(result.position)
                    if inspect.isawaitable(maybe):
                        await maybe
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    await self.leave(permit_id)
                    raise SemaphoreTimeout(
                        f"no permit of {self.name!r} for {permit_id!r} within {timeout:g}s"
                    )
                # Ask again before the waiter heartbeat runs out, however long the poll interval.
                # With capacity 0 (no worker yet: a cold start) asking cannot succeed: only the
                # heartbeat is due, unless `wake()` says the capacity changed.
                interval = self._beat_s if cap <= 0 else poll_interval
                pause = min(remaining, interval * random.uniform(0.8, 1.2), self._beat_s)
                wake = self._wake
                await wait_set(wake, pause)
        except SemaphoreTimeout:
            raise
        except BaseException:
            # Cancelled or failed mid-wait: do not leave a ghost in the line or a stray permit.
            cleanup = asyncio.ensure_future(self.release(permit_id))
            try:
                await asyncio.shield(cleanup)
            except Exception:  # the original error matters more
                pass
            except asyncio.CancelledError:
                pass  # cancelled again: the shielded cleanup runs on by itself
            raise

    def wake(self) -> None:
        """Make this process's waiters ask again now (the capacity may have changed)."""
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def refresh(self, permit_ids: Iterable[str]) -> list[str]:
        """Extend the leases of those permits still held; returns the ids that are not held
        (their lease ran out, or they were released): lapsed, to be handled by the caller."""
        ids = list(permit_ids)
        if not ids:
            return []
        return _strs(await self._refresh(keys=self._keys, args=[self.lease_ms, *ids]))

    async def release(self, permit_id: str) -> bool:
        """Give the permit back (idempotent; also leaves the line). True if it was held."""
        try:
            held = await self._release(keys=self._keys, args=[permit_id])
        finally:
            self.wake()
        return bool(held)

    async def leave(self, permit_id: str) -> None:
        """Leave the waiting line (idempotent); a held permit is kept."""
        await self._leave(keys=self._keys, args=[permit_id])

    async def counts(self) -> tuple[int, int]:
        """(held, waiting), after dropping expired leases and vanished waiters."""
        held, waiting = await self._counts(keys=self._keys)
        return int(held), int(waiting)

    async def holders(self) -> list[str]:
        """Permit ids held now, soonest lease expiry first."""
        return _strs(await self._list(keys=self._keys, args=[1]))

    async def waiters(self) -> list[str]:
        """Permit ids in the waiting line, head first."""
        return _strs(await self._list(keys=self._keys, args=[2]))


def _strs(values: list[Any]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]
