"""ChatStream sessions in Redis: one hash per session, and the lock of its running turn.

The hash `Keys.session(sid)` has these fields, and slides its TTL on every access:

- `history`: JSON list of `{"role", "content"}` messages (assistant ones carry `"id"`), oldest
  first, without the system prompt, trimmed to the history budget (sessions/history.py);
- `prompt`: the prompt the worker rendered for the last turn, followed by that turn's reply;
- `p:<name>`: the session's generation-parameter overrides (JSON values);
- `role`: the client role a UI pass phrase promoted the session to (gateway/chatstream/roles.py);
  /clear_context keeps it;
- `epoch`: bumped by /clear_context, so a turn that ends after a clear does not bring the old
  history back; `created_ms`, `updated_ms`, `last_turn_ms`: wall-clock timestamps.

A turn holds `Keys.session_lock(sid)` (SET NX PX with a random token, lease refreshed while it
runs, released by compare-and-delete) so two turns never interleave their history writes.

Each API key (`owner`: its id, `anon` without keys) keeps at most `max_per_owner` sessions: the
sorted set `Keys.session_index(owner)` holds its session ids by last use, every load and change
refreshes the score, and a change that makes a session beyond the cap deletes the key's least
recently used ones. Sessions therefore take at most (keys + 1) x `--max-sessions-per-key` x the
size of one session (bounded by the history budget, docs/security.md) in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis

from chatstream_cluster.gateway.sessions.history import Message
from chatstream_cluster.gateway.sessions.params import DEFAULT_PARAMS
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS
from chatstream_cluster.shared.supervise import cancel_and_wait

log = logging.getLogger("chatstream.gateway")

LOCK_LEASE_S = 30.0  # a turn's lock expires this long after its gateway stops refreshing it
MAX_TURN_S = 3600.0  # a lock is never refreshed past this (a leaked turn frees its session)
ANON_OWNER = "anon"  # the owner of every session when no API keys are set
UNBOUNDED = 2**62


@dataclass
class Session:
    """What one session hash held when it was loaded."""

    sid: str
    owner: str = ""  # the API key id the session belongs to ("" without keys)
    history: list[Message] = field(default_factory=list)
    prompt: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    epoch: str = "0"
    role: str | None = None
    created_ms: int = 0
    updated_ms: int = 0

    def params(self, defaults: dict[str, Any] = DEFAULT_PARAMS) -> dict[str, Any]:
        """The defaults merged with this session's overrides."""
        return {**defaults, **self.overrides}

    def find_reply(self, message_id: str) -> int | None:
        """Index of the assistant message with this id, if the history still has it."""
        for i, msg in enumerate(self.history):
            if msg.get("id") == message_id and msg["role"] == "assistant":
                return i
        return None


# KEYS: session hash. ARGV: epoch, history json, prompt, now ms, ttl ms.
_SAVE_TURN = """
local epoch = redis.call('HGET', KEYS[1], 'epoch') or '0'
if epoch ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'history', ARGV[2], 'prompt', ARGV[3], 'updated_ms', ARGV[4],
           'last_turn_ms', ARGV[4])
redis.call('HSETNX', KEYS[1], 'created_ms', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS: session hash. ARGV: now ms, ttl ms.
_CLEAR = """
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HDEL', KEYS[1], 'history', 'prompt')
redis.call('HSET', KEYS[1], 'updated_ms', ARGV[1])
redis.call('HSETNX', KEYS[1], 'created_ms', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: the owner's session index. ARGV: sid, now ms, ttl ms, most sessions.
# Records the session's use; returns the owner's least recently used other sessions past the
# cap (taken out of the index here; the caller deletes their hashes).
_CLAIM = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]))
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[4])
if over <= 0 then return {} end
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, over)) do
  if #out < over and id ~= ARGV[1] then table.insert(out, id) end
end
redis.call('ZREM', KEYS[1], unpack(out))
return out
"""

# KEYS: lock. ARGV: token[, lease ms]. Only the holder may refresh or delete its lock.
_LOCK_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_LOCK_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class SessionLock:
    """The lock of one running turn; its lease is refreshed until `release()`."""

    def __init__(self, store: SessionStore, sid: str, token: str) -> None:
        self.store = store
        self.key = store.keys.session_lock(sid)
        self.token = token
        self._released = False
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        lease_ms = int(self.store.lock_lease_s * 1000)
        deadline = time.monotonic() + MAX_TURN_S
        while time.monotonic() < deadline:
            await asyncio.sleep(self.store.lock_lease_s / 3)
            try:
                if not await self.store._lock_refresh(keys=[self.key], args=[self.token, lease_ms]):
                    return  # lost (expired and taken): nothing left to refresh
            except TRANSIENT_REDIS_ERRORS as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError() from None  # redis-py may mask a cancel
                log.warning("session lock refresh failed", extra={"error": str(exc)})

    async def release(self) -> None:
        """Give the lock back if this turn still holds it (idempotent)."""
        if self._released:
            return
        self._released = True
        await cancel_and_wait([self._task])
        try:
            await self.store._lock_release(keys=[self.key], args=[self.token])
        except TRANSIENT_REDIS_ERRORS as exc:
            log.warning("session lock release failed; it expires", extra={"error": str(exc)})


class SessionStore:
    """Load and change sessions; every access slides the session's TTL."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, ttl_s: float, lock_lease_s: float = LOCK_LEASE_S,
        max_per_owner: int = UNBOUNDED,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.lock_lease_s = lock_lease_s
        self.max_per_owner = max_per_owner
        self._claim = redis.register_script(_CLAIM)
        self._save_turn = redis.register_script(_SAVE_TURN)
        self._clear = redis.register_script(_CLEAR)
        self._lock_refresh = redis.register_script(_LOCK_REFRESH)
        self._lock_release = redis.register_script(_LOCK_RELEASE)

    def _index(self, owner: str) -> str:
        return self.keys.session_index(owner or ANON_OWNER)

    async def _record_use(self, sid: str, owner: str) -> None:
        """Note the session's use in its owner's index; delete the owner's least recently used
        sessions past `max_per_owner`."""
        evicted = await self._claim(keys=[self._index(owner)],
                                    args=[sid, _now_ms(), self.ttl_ms, self.max_per_owner])
        if evicted:
            async with self.redis.pipeline(transaction=False) as pipe:
                for sid_bytes in evicted:  # one key per command: fine on Redis Cluster too
                    pipe.delete(self.keys.session(sid_bytes.decode()))
                await pipe.execute()
            log.info("sessions evicted: per-key cap", extra={
                "owner": owner or ANON_OWNER, "evicted": len(evicted),
                "max_sessions_per_key": self.max_per_owner})

    async def load(self, sid: str, owner: str = "") -> Session:
        """The session's contents (empty for a new or expired one)."""
        key = self.keys.session(sid)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(key)
            pipe.pexpire(key, self.ttl_ms)
            pipe.zadd(self._index(owner), {sid: _now_ms()}, xx=True)  # a known session's use
            raw, _, _ = await pipe.execute()
        fields = {k.decode(): v for k, v in raw.items()}
        session = Session(sid, owner)
        if b := fields.get("history"):
            session.history = orjson.loads(b)
        if b := fields.get("prompt"):
            session.prompt = b.decode()
        session.epoch = fields.get("epoch", b"0").decode()
        if b := fields.get("role"):
            session.role = b.decode()
        session.created_ms = int(fields.get("created_ms", b"0"))
        session.updated_ms = int(fields.get("updated_ms", b"0"))
        for name in DEFAULT_PARAMS:
            if (b := fields.get("p:" + name)) is not None:
                session.overrides[name] = orjson.loads(b)
        return session

    async def save_turn(self, session: Session, history: list[Message], prompt: str) -> bool:
        """Store a finished turn; False when the session was cleared while it ran."""
        saved = await self._save_turn(
            keys=[self.keys.session(session.sid)],
            args=[session.epoch, orjson.dumps(history), prompt, _now_ms(), self.ttl_ms],
        )
        if saved:
            await self._record_use(session.sid, session.owner)
        return bool(saved)

    async def clear(self, sid: str, owner: str = "") -> None:
        """Forget the history and prompt (the generation params stay)."""
        await self._clear(keys=[self.keys.session(sid)], args=[_now_ms(), self.ttl_ms])
        await self._record_use(sid, owner)

    async def set_params(self, sid: str, changes: dict[str, Any], owner: str = "") -> None:
        """Apply overrides; a None value removes the override."""
        key = self.keys.session(sid)
        now = _now_ms()
        async with self.redis.pipeline(transaction=True) as pipe:
            for name, value in changes.items():
                if value is None:
                    pipe.hdel(key, "p:" + name)
                else:
                    pipe.hset(key, "p:" + name, orjson.dumps(value))
            pipe.hset(key, "updated_ms", now)
            pipe.hsetnx(key, "created_ms", now)
            pipe.pexpire(key, self.ttl_ms)
            await pipe.execute()
        await self._record_use(sid, owner)

    async def set_role(self, sid: str, role: str) -> None:
        """Record the client role the session was promoted to."""
        key = self.keys.session(sid)
        now = _now_ms()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"role": role, "updated_ms": now})
            pipe.hsetnx(key, "created_ms", now)
            pipe.pexpire(key, self.ttl_ms)
            await pipe.execute()

    async def has_history(self, sid: str) -> bool:
        return bool(await self.redis.hexists(self.keys.session(sid), "history"))

    async def seed_history(self, sid: str, history: list[Message]) -> bool:
        """Give a session without history this one (a RequestHandler's restore); False when
        it already has a history."""
        key = self.keys.session(sid)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, "history", orjson.dumps(history))
            pipe.hsetnx(key, "created_ms", _now_ms())
            pipe.pexpire(key, self.ttl_ms)
            seeded, _, _ = await pipe.execute()
        return bool(seeded)

    async def lock(self, sid: str) -> SessionLock | None:
        """Take the session's turn lock; None while another turn holds it."""
        token = secrets.token_hex(16)
        acquired = await self.redis.set(
            self.keys.session_lock(sid), token, nx=True, px=int(self.lock_lease_s * 1000)
        )
        return SessionLock(self, sid, token) if acquired else None


def _now_ms() -> int:
    return int(time.time() * 1000)
