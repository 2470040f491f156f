"""The worker registry: heartbeats in, the list of live workers out (Redis clock only)."""

from __future__ import annotations

import orjson
import redis.asyncio as aioredis
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.schemas import WorkerInfo

# A heartbeat is two scripts of one key each (the worker hash and the workers zset live in
# different cluster slots), one after the other: the hash first, so a listed id has its hash.
# KEYS: worker hash. ARGV: ttl_ms, info json.
_HEARTBEAT_INFO = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], 'info', ARGV[2], 'heartbeat_ms', now)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return now
"""
# KEYS: workers zset. ARGV: id, ttl_ms. Score = expiry (server ms).
_HEARTBEAT_LIST = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return now
"""

# KEYS: workers zset. Purges expired ids, returns {now_ms, id1, id2, ...}.
_LIVE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
table.insert(ids, 1, now)
return ids
"""


class WorkerRegistry:
    """Register workers and list the live ones."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._heartbeat_info = redis.register_script(_HEARTBEAT_INFO)
        self._heartbeat_list = redis.register_script(_HEARTBEAT_LIST)
        self._live = redis.register_script(_LIVE)

    async def heartbeat(self, info: WorkerInfo, ttl_s: float) -> None:
        """Announce `info` for the next `ttl_s` seconds."""
        ttl_ms = int(ttl_s * 1000)
        await self._heartbeat_info(
            keys=[self.keys.worker(info.id)], args=[ttl_ms, info.model_dump_json()]
        )
        await self._heartbeat_list(keys=[self.keys.workers], args=[info.id, ttl_ms])

    async def remove(self, worker_id: str) -> None:
        """Leave the registry at once (clean shutdown)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self.keys.workers, worker_id)
            pipe.delete(self.keys.worker(worker_id))
            await pipe.execute()

    async def live(self) -> list[tuple[WorkerInfo, float]]:
        """Live workers with the seconds since their last heartbeat, sorted by id."""
        reply = await self._live(keys=[self.keys.workers])
        now_ms, ids = int(reply[0]), [i.decode() for i in reply[1:]]
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.hmget(self.keys.worker(wid), "info", "heartbeat_ms")
            rows = await pipe.execute()
        out = []
        for info_json, beat in rows:
            if info_json is None:
                continue
            info = WorkerInfo.model_validate(orjson.loads(info_json))
            out.append((info, max(0.0, (now_ms - int(beat or now_ms)) / 1000)))
        return sorted(out, key=lambda pair: pair[0].id)

    async def is_alive(self, worker_id: str) -> bool:
        """True when `worker_id` heartbeated within its TTL."""
        return any(info.id == worker_id for info, _age in await self.live())
