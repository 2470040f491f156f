"""A job's token events: fenced writes by workers, reads for gap repair and resume.

Each event goes, in one Lua call, to the job's short-lived stream (entry id `<seq>-0`) and to
the reply channel the job's meta names (the gateway relaying it now; a resume moves it). The
call checks the job's attempt first, so a worker that lost the job (a stale attempt) cannot
write; it refuses plain events of a cancelled job, which tells the worker to stop. Three kinds
of write: a plain event; the final event (stop, length or error: the job is `done`); and a park
event (the worker stopped generating because nobody listens or the client left: the job is
`parked`, resumable, see shared/job_state.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.schemas import TokenEvent

FENCED = -1
CANCELLED = -2
DUPLICATE = -3  # this seq was stored by an earlier try of the same publish

PLAIN, FINAL, PARK = "e", "f", "p"

# KEYS: meta, events. ARGV: attempt, seq, packed event, fallback channel, ttl ms, kind.
_PUBLISH_EVENT = """
local meta = redis.call('HMGET', KEYS[1], 'attempt', 'cancel', 'channel')
if meta[1] ~= ARGV[1] then return -1 end
local kind = ARGV[6]
if meta[2] and kind == 'e' then return -2 end
local added = redis.pcall('XADD', KEYS[2], ARGV[2] .. '-0', 'e', ARGV[3])
if type(added) == 'table' and added.err then return -3 end
redis.call('PEXPIRE', KEYS[2], ARGV[5])
if kind == 'f' then
  redis.call('HSET', KEYS[1], 'status', 'done')
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
elseif kind == 'p' then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'status', 'parked',
             'parked_ms', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
return redis.call('PUBLISH', meta[3] or ARGV[4], ARGV[3])
"""


@dataclass
class PendingPublish:
    """One event to publish for one job (`channel`: where to send it if the job's meta names
    none)."""

    event: TokenEvent
    channel: str

    @property
    def kind(self) -> str:
        if self.event.finish_reason:
            return FINAL
        return PARK if self.event.parked else PLAIN


class EventWriter:
    """Worker side: publish many jobs' events in one pipelined round trip."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, ttl_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = int(ttl_s * 1000)
        self._script = redis.register_script(_PUBLISH_EVENT)

    async def publish(self, batch: list[PendingPublish]) -> list[int]:
        """Returns per event: receivers (>= 0), FENCED, CANCELLED or DUPLICATE.

        One round trip for the whole batch: EVALSHA straight into the pipeline (a redis-py
        `Script` in a pipeline would first ask SCRIPT EXISTS, a second round trip per batch);
        only when Redis lost its script cache (NOSCRIPT, e.g. after a restart) is the script
        loaded and the refused events sent again.
        """
        if not batch:
            return []
        results = await self._send(batch)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await self.redis.script_load(_PUBLISH_EVENT)
            again = await self._send([batch[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        for result in results:
            if isinstance(result, Exception):
                raise result
        return [int(r) for r in results]

    async def _send(self, batch: list[PendingPublish]) -> list[Any]:
        sha, ttl_ms, keys = self._script.sha, self.ttl_ms, self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for item in batch:
                ev = item.event
                pipe.evalsha(
                    sha,
                    2,
                    keys.job_meta(ev.job_id),
                    keys.job_events(ev.job_id),
                    ev.attempt,
                    ev.seq,
                    ev.pack(),
                    item.channel,
                    ttl_ms,
                    item.kind,
                )
            return await pipe.execute(raise_on_error=False)


async def read_events(
    redis: aioredis.Redis, keys: Keys, job_id: str, after_seq: int = 0, count: int | None = None
) -> list[TokenEvent]:
    """The job's stored events with seq > after_seq, in order."""
    entries = await redis.xrange(keys.job_events(job_id), min=f"{after_seq + 1}-0", count=count)
    return [TokenEvent.unpack(fields[b"e"]) for _eid, fields in entries]


async def last_event(redis: aioredis.Redis, keys: Keys, job_id: str) -> TokenEvent | None:
    """The job's last stored event, if any."""
    entries = await redis.xrevrange(keys.job_events(job_id), count=1)
    return TokenEvent.unpack(entries[0][1][b"e"]) if entries else None


async def replay_state(redis: aioredis.Redis, keys: Keys, job_id: str) -> tuple[int, str, int]:
    """(last seq, text so far, tokens so far) of a job, to continue it on another worker."""
    events = await read_events(redis, keys, job_id)
    text = "".join(e.text for e in events)
    last = events[-1] if events else None
    return (last.seq if last else 0), text, (last.tokens if last else 0)
