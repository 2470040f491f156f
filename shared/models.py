"""The served models a cluster knows: those a worker served lately, and those declared.

One cluster serves several models side by side. Each worker serves one, under its served name
(`--served-model-name`, default its `--model`), and each served model has its own job
stream(s), its own semaphore (so its own capacity and waiting line) and its own figures.

A model is *known* when a worker of it heartbeated within `KNOWN_FOR_S` (the workers record
that in the `Keys.models` hash, a single key) or when the gateways declare it (`--models`).
A request for a known model with no live worker can wait for one to start (scale from zero,
`--cold-start-timeout`); a request for a model the cluster does not know gets 404.
"""

from __future__ import annotations

import re

import redis.asyncio as aioredis

from chatstream_cluster.shared.keys import Keys

KNOWN_FOR_S = 24 * 3600  # a model no worker served for this long is forgotten
MAX_NAME_CHARS = 256
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]+$")

# KEYS: the models hash. ARGV: name. Records that a worker of `name` is live now (Redis clock).
_SEEN = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], t[1] * 1000 + math.floor(t[2] / 1000))
return 1
"""

# KEYS: the models hash. ARGV: max age ms. Drops the entries older than that; returns the
# others as {now_ms, name1, seen1, name2, seen2, ...}.
_KNOWN = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local all = redis.call('HGETALL', KEYS[1])
local out = {now}
for i = 1, #all, 2 do
  if now - tonumber(all[i + 1]) > tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], all[i])
  else
    table.insert(out, all[i])
    table.insert(out, all[i + 1])
  end
end
return out
"""


def check_served_name(name: str) -> str:
    """`name` if it can be a served model name (printable, 1-256 characters), else ValueError."""
    if not (0 < len(name) <= MAX_NAME_CHARS and _PRINTABLE.match(name)):
        raise ValueError(f"a served model name must be 1-{MAX_NAME_CHARS} printable "
                         f"characters: {name!r}")
    return name


class ModelRegistry:
    """Record the models the workers serve; list the ones known now."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._seen = redis.register_script(_SEEN)
        self._known = redis.register_script(_KNOWN)

    async def seen(self, name: str) -> None:
        """A worker of `name` is live (called with its heartbeat)."""
        await self._seen(keys=[self.keys.models], args=[name])

    async def known(self, max_age_s: float = KNOWN_FOR_S) -> dict[str, float]:
        """Model name -> seconds since a worker of it was last live, for those seen within
        `max_age_s` (older entries are dropped)."""
        reply = await self._known(keys=[self.keys.models], args=[int(max_age_s * 1000)])
        now = int(reply[0])
        items = reply[1:]
        return {
            _s(items[i]): max(0.0, (now - int(items[i + 1])) / 1000)
            for i in range(0, len(items), 2)
        }


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
