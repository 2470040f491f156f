"""Registries of live processes: heartbeats in, the list of live members out (Redis clock only).

A registry is a sorted set of ids scored by heartbeat expiry plus one hash per member holding
its info (JSON). `WorkerRegistry` lists the workers (what they serve, their load); the
`GatewayRegistry` lists the gateways with the admission settings they enforce, so that
`chatstream status` reports the capacity the gateways really use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel

from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.schemas import GatewayInfo, WorkerInfo

# A heartbeat is two scripts of one key each (the member hash and the members zset live in
# different cluster slots), one after the other: the hash first, so a listed id has its hash.
# KEYS: member hash. ARGV: ttl_ms, info json.
_HEARTBEAT_INFO = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], 'info', ARGV[2], 'heartbeat_ms', now)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return now
"""
# KEYS: members zset. ARGV: id, ttl_ms. Score = expiry (server ms).
_HEARTBEAT_LIST = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return now
"""

# KEYS: members zset. Purges expired ids, returns {now_ms, id1, id2, ...}.
_LIVE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
table.insert(ids, 1, now)
return ids
"""

Info = TypeVar("Info", bound=BaseModel)


class Registry(Generic[Info]):
    """Register members (each with an `id`) and list the live ones."""

    def __init__(
        self, redis: aioredis.Redis, members: str, member_key: Callable[[str], str],
        model: type[Info],
    ) -> None:
        self.redis = redis
        self.members = members
        self.member_key = member_key
        self.model = model
        self._heartbeat_info = redis.register_script(_HEARTBEAT_INFO)
        self._heartbeat_list = redis.register_script(_HEARTBEAT_LIST)
        self._live = redis.register_script(_LIVE)

    async def heartbeat(self, info: Info, ttl_s: float) -> None:
        """Announce `info` for the next `ttl_s` seconds."""
        member_id = info.id  # type: ignore[attr-defined]
        ttl_ms = int(ttl_s * 1000)
        await self._heartbeat_info(
            keys=[self.member_key(member_id)], args=[ttl_ms, info.model_dump_json()]
        )
        await self._heartbeat_list(keys=[self.members], args=[member_id, ttl_ms])

    async def remove(self, member_id: str) -> None:
        """Leave the registry at once (clean shutdown)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self.members, member_id)
            pipe.delete(self.member_key(member_id))
            await pipe.execute()

    async def live(self) -> list[tuple[Info, float]]:
        """Live members with the seconds since their last heartbeat, sorted by id."""
        reply = await self._live(keys=[self.members])
        now_ms, ids = int(reply[0]), [i.decode() for i in reply[1:]]
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for member_id in ids:
                pipe.hmget(self.member_key(member_id), "info", "heartbeat_ms")
            rows = await pipe.execute()
        out = []
        for info_json, beat in rows:
            if info_json is None:
                continue
            info = self.model.model_validate(orjson.loads(info_json))
            out.append((info, max(0.0, (now_ms - int(beat or now_ms)) / 1000)))
        return sorted(out, key=lambda pair: pair[0].id)  # type: ignore[attr-defined]

    async def is_alive(self, member_id: str) -> bool:
        """True when `member_id` heartbeated within its TTL."""
        return any(info.id == member_id for info, _age in await self.live())  # type: ignore[attr-defined]


class WorkerRegistry(Registry[WorkerInfo]):
    """The live workers."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        super().__init__(redis, keys.workers, keys.worker, WorkerInfo)


class GatewayRegistry(Registry[GatewayInfo]):
    """The live gateways and the admission settings each one enforces."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        super().__init__(redis, keys.gateways, keys.gateway, GatewayInfo)
