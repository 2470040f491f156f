"""The worker registry: heartbeats in, the list of live workers out (Redis clock only)."""

from __future__ import annotations

import orjson
import redis.asyncio as aioredis

from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.schemas import WorkerInfo

# KEYS: workers zset, worker hash. ARGV: id, ttl_ms, info json. Score = expiry (server ms).
_HEARTBEAT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], 'info', ARGV[3], 'heartbeat_ms', now)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
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
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._live = redis.register_script(_LIVE)

    async def heartbeat(self, info: WorkerInfo, ttl_s: float) -> None:
        """Announce `info` for the next `ttl_s` seconds."""
        await self._heartbeat(
            keys=[self.keys.workers, self.keys.worker(info.id)],
            args=[info.id, int(ttl_s * 1000), info.model_dump_json()],
        )

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
