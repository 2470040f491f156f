"""A job's state in its meta hash, and every change of it: one Lua script per change.

States: `queued` (an entry waits in the job stream) → `running` (a worker's attempt holds it)
→ `done` (its final event is stored: stop, length or error). A job whose listener went away
(the client disconnected, or its gateway died and the worker's events reached nobody) is
`parked`: the worker stopped generating at once (its GPU slot is free), and the text so far
stays in the job's event stream. Within the resume window a resume requeues a parked job and a
worker continues it from prompt + text so far; past the window it is `expired`.

Fields: `attempt` (the fence: a worker's writes are refused once a later attempt exists),
`status`, `worker`, `spec` (the packed JobSpec), `owner` (who may resume it: `key:<api key
id>`, `sid:<session id>` or `open`), `channel` (the reply channel of the gateway relaying it
now: workers publish there), `listener` (a token of the connection relaying it now: only that
one may cancel it; a resume takes it over), `nonce` (the valid queue entry: an entry with
another nonce is stale and never runs, so a job never runs twice at once), `cancel`,
`parked_ms`.

Every script touches only the job's own meta hash (one Redis Cluster slot).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import StrEnum

import redis.asyncio as aioredis

from chatstream_cluster.shared.keys import Keys

META_TTL_S = 24 * 3600

# Redis clock in ms, as a Lua expression prelude.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: meta. ARGV: entry nonce, worker id, '1' when the entry was taken over from a dead worker.
# Returns {attempt, takeovers} to run it, or {0, reason}: stale (another entry is the valid
# one), gone (meta expired), parked (cancelled before it started: parked now), done, expired.
# A parked job's entry with a new nonce is a resume's: it becomes the valid one here (the
# resume's `attach` may come a moment later; the job's events are in its stream meanwhile).
_BEGIN_ATTEMPT = _NOW + """
local m = redis.call('HMGET', KEYS[1], 'status', 'nonce', 'cancel')
if not m[1] then return {0, 'gone'} end
if m[1] == 'parked' and m[2] ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'status', 'queued', 'nonce', ARGV[1])
  redis.call('HDEL', KEYS[1], 'cancel', 'parked_ms')
  m = {'queued', ARGV[1], false}
end
if m[2] and m[2] ~= ARGV[1] then return {0, 'stale'} end
if m[1] == 'done' or m[1] == 'expired' or m[1] == 'parked' then return {0, m[1]} end
if m[3] then
  redis.call('HSET', KEYS[1], 'status', 'parked', 'parked_ms', now)
  return {0, 'parked'}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2])
local takeovers = 0
if ARGV[3] == '1' then takeovers = redis.call('HINCRBY', KEYS[1], 'takeovers', 1) end
return {attempt, takeovers}
"""

# KEYS: meta. ARGV: resume window ms. Returns {status, owner, spec, age_ms}; status '' when
# the job is unknown; a parked job past the window is marked expired here.
_PEEK = _NOW + """
local m = redis.call('HMGET', KEYS[1], 'status', 'owner', 'spec', 'parked_ms')
if not m[1] then return {'', '', '', 0} end
local age = 0
if m[1] == 'parked' then
  age = now - tonumber(m[4] or now)
  if age > tonumber(ARGV[1]) then
    redis.call('HSET', KEYS[1], 'status', 'expired')
    m[1] = 'expired'
  end
end
return {m[1], m[2] or '', m[3] or '', age}
"""

# KEYS: meta. ARGV: owner, channel, listener, resume window ms, entry nonce ('' = none), ttl.
# Returns the outcome: unknown, done, expired, attached (queued or running: events go to the
# new channel from now on), requeued (the entry with this nonce is the valid one: it was
# parked and is queued now, or a worker already started it), needs_entry (parked, but no
# nonce was given: add an entry and call again).
_ATTACH = _NOW + """
local m = redis.call('HMGET', KEYS[1], 'status', 'owner', 'parked_ms')
if not m[1] or m[2] ~= ARGV[1] then return 'unknown' end
local status = m[1]
if status == 'parked' and now - tonumber(m[3] or now) > tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'status', 'expired')
  status = 'expired'
end
if status == 'done' or status == 'expired' then return status end
if status == 'parked' then
  if ARGV[5] == '' then return 'needs_entry' end
  redis.call('HSET', KEYS[1], 'status', 'queued', 'nonce', ARGV[5], 'channel', ARGV[2],
             'listener', ARGV[3])
  redis.call('HDEL', KEYS[1], 'cancel', 'parked_ms')
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  return 'requeued'
end
redis.call('HSET', KEYS[1], 'channel', ARGV[2], 'listener', ARGV[3])
redis.call('HDEL', KEYS[1], 'cancel')
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'nonce') == ARGV[5] then return 'requeued' end
return 'attached'
"""

# KEYS: meta. ARGV: listener. Only the job's current listener may stop it.
# Returns 'running' (the cancel flag is set: its worker parks it), 'parked' (it was queued: it
# is parked now and never starts), 'superseded' (another connection relays it now), or
# 'not_running' (finished, parked, expired or unknown).
_CANCEL = _NOW + """
local m = redis.call('HMGET', KEYS[1], 'status', 'listener')
if not m[1] then return 'not_running' end
if m[2] ~= ARGV[1] then return 'superseded' end
if m[1] == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', 1)
  return 'running'
end
if m[1] == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'parked', 'parked_ms', now, 'cancel', 1)
  return 'parked'
end
return 'not_running'
"""

# KEYS: meta. Returns {status, listener} ('' for a field that is not there).
_WATCH = """
local m = redis.call('HMGET', KEYS[1], 'status', 'listener')
return {m[1] or '', m[2] or ''}
"""


class Attach(StrEnum):
    """What a resume found (see `_ATTACH`)."""

    UNKNOWN = "unknown"
    DONE = "done"
    EXPIRED = "expired"
    ATTACHED = "attached"
    REQUEUED = "requeued"
    NEEDS_ENTRY = "needs_entry"


@dataclass(frozen=True)
class Peek:
    """A job's state as a resume first sees it."""

    status: str  # '' = unknown
    owner: str
    spec: bytes
    parked_for_ms: int


def new_token() -> str:
    """A random token for a listener or an entry nonce."""
    return secrets.token_hex(8)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobStates:
    """The state changes of jobs (module docstring), each one atomic on the job's meta hash."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._begin = redis.register_script(_BEGIN_ATTEMPT)
        self._peek = redis.register_script(_PEEK)
        self._attach = redis.register_script(_ATTACH)
        self._cancel = redis.register_script(_CANCEL)
        self._watch = redis.register_script(_WATCH)

    async def begin_attempt(
        self, job_id: str, nonce: str, worker_id: str, *, takeover: bool = False
    ) -> tuple[int, int, str]:
        """Bump the fence and mark the job running: (attempt, takeovers so far, ""), or
        (0, 0, why not). `takeover`: the entry was claimed from a dead worker (counted, so a
        job that kills every worker stops being retried)."""
        reply = await self._begin(
            keys=[self.keys.job_meta(job_id)], args=[nonce, worker_id, "1" if takeover else ""]
        )
        if int(reply[0]):
            return int(reply[0]), int(reply[1]), ""
        return 0, 0, _text(reply[1])

    async def peek(self, job_id: str, window_s: float) -> Peek:
        """Status, owner and spec of a job (marking a parked one past `window_s` expired)."""
        status, owner, spec, age = await self._peek(
            keys=[self.keys.job_meta(job_id)], args=[int(window_s * 1000)]
        )
        return Peek(_text(status), _text(owner), spec if isinstance(spec, bytes) else b"",
                    int(age))

    async def attach(
        self, job_id: str, *, owner: str, channel: str, listener: str, window_s: float,
        nonce: str = "",
    ) -> Attach:
        """Make `listener` on `channel` the job's relay (a resume); see `_ATTACH`."""
        reply = await self._attach(
            keys=[self.keys.job_meta(job_id)],
            args=[owner, channel, listener, int(window_s * 1000), nonce, META_TTL_S],
        )
        return Attach(_text(reply))

    async def cancel(self, job_id: str, listener: str) -> str:
        """Stop the job if `listener` still relays it: 'running', 'parked', 'superseded' or
        'not_running'."""
        reply = await self._cancel(keys=[self.keys.job_meta(job_id)], args=[listener])
        return _text(reply)

    async def watch(self, job_id: str) -> tuple[str, str]:
        """(status, listener) now; ('', '') for an unknown job."""
        status, listener = await self._watch(keys=[self.keys.job_meta(job_id)])
        return _text(status), _text(listener)
