"""The job queue: a Redis Stream read by the workers' consumer group (at-least-once).

A job's life: the gateway `enqueue`s it (meta hash with attempt 0, then XADD); a worker
reads it (`read`), fences it (`begin_attempt` bumps the attempt), keeps its pending entry
fresh (`touch`) and `finish`es it (XACK + XDEL). Entries of a dead worker go idle and
another worker takes them over with `reclaim` (XAUTOCLAIM).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from chatstream_cluster.shared.keys import JOBS_GROUP, Keys, safe_id
from chatstream_cluster.shared.schemas import ControlMessage, JobSpec

META_TTL_S = 24 * 3600

# Bump the fence and mark the job running; returns {attempt, cancelled}.
_BEGIN_ATTEMPT = """
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1])
local cancelled = redis.call('HGET', KEYS[1], 'cancel')
return {attempt, cancelled and 1 or 0}
"""


# Put a job back in the queue to continue it (a client resumed it). KEYS: meta, jobs stream.
# ARGV: packed spec (with the resuming gateway's reply channel), job id, meta ttl.
# Returns {0} unknown job, {1} finished (replay only), {2, entry id} queued again.
_RESUBMIT = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {0} end
local cancelled = redis.call('HGET', KEYS[1], 'cancel')
if status == 'done' and not cancelled then return {1} end
redis.call('HDEL', KEYS[1], 'cancel')
redis.call('HSET', KEYS[1], 'status', 'queued', 'spec', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local id = redis.call('XADD', KEYS[2], '*', 'spec', ARGV[1], 'job_id', ARGV[2])
return {2, id}
"""

UNKNOWN, FINISHED, RESUBMITTED = 0, 1, 2


@dataclass
class JobEntry:
    """A job read from the stream; `spec` is None when the entry could not be decoded."""

    entry_id: str
    spec: JobSpec | None
    raw: dict[bytes, bytes]
    error: str = ""


def _decode_entry(entry_id: bytes | str, fields: dict[bytes, bytes] | None) -> JobEntry:
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    fields = fields or {}
    try:
        spec = JobSpec.unpack(fields[b"spec"])
        safe_id(spec.job_id)  # a job id that may not reach a key name is garbage too
        return JobEntry(eid, spec, fields)
    except Exception as exc:  # noqa: BLE001 - any garbage must become a dead letter
        return JobEntry(eid, None, fields, error=f"{type(exc).__name__}: {exc}"[:500])


class JobQueue:
    """Producer and consumer side of the job stream."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._begin = redis.register_script(_BEGIN_ATTEMPT)
        self._resubmit = redis.register_script(_RESUBMIT)

    async def ensure_group(self) -> None:
        """Create the stream and the consumer group if missing (idempotent)."""
        try:
            await self.redis.xgroup_create(self.keys.jobs, JOBS_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # --- gateway side ----------------------------------------------------------------------
    async def enqueue(self, spec: JobSpec) -> str:
        """Make the job visible to workers; returns the stream entry id."""
        meta = self.keys.job_meta(spec.job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(meta, mapping={"attempt": 0, "status": "queued", "spec": spec.pack()})
            pipe.expire(meta, META_TTL_S)
            pipe.xadd(self.keys.jobs, {"spec": spec.pack(), "job_id": spec.job_id})
            result = await pipe.execute()
        entry_id = result[-1]
        return entry_id.decode() if isinstance(entry_id, bytes) else entry_id

    async def stored_spec(self, job_id: str) -> JobSpec | None:
        """The spec a job was enqueued with, while its meta hash lives."""
        packed = await self.redis.hget(self.keys.job_meta(job_id), "spec")
        return JobSpec.unpack(packed) if packed else None

    async def resubmit(self, spec: JobSpec) -> tuple[int, str | None]:
        """Queue a cancelled or unfinished job again so it continues where it stopped.

        Returns (UNKNOWN | FINISHED | RESUBMITTED, entry id)."""
        reply = await self._resubmit(
            keys=[self.keys.job_meta(spec.job_id), self.keys.jobs],
            args=[spec.pack(), spec.job_id, META_TTL_S],
        )
        entry = reply[1] if len(reply) > 1 else None
        return int(reply[0]), entry.decode() if isinstance(entry, bytes) else entry

    async def cancel(self, job_id: str) -> None:
        """Tell the workers to stop a job: a flag they check, and a broadcast."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.job_meta(job_id), "cancel", 1)
            pipe.publish(
                self.keys.control_channel, ControlMessage(kind="cancel", job_id=job_id).pack()
            )
            await pipe.execute()

    async def withdraw(self, entry_id: str) -> int:
        """Remove a job no worker has read yet; returns 1 if it was removed."""
        return await self.redis.xdel(self.keys.jobs, entry_id)

    async def undelivered(self) -> int:
        """Entries no worker has read yet (XLEN minus pending; finished entries are deleted)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.keys.jobs)
            pipe.xpending(self.keys.jobs, JOBS_GROUP)
            try:
                length, pending = await pipe.execute()
            except ResponseError:  # no stream or group yet
                return 0
        return max(0, int(length) - int(pending["pending"]))

    # --- worker side -----------------------------------------------------------------------
    async def read(self, consumer: str, count: int, block_ms: int) -> list[JobEntry]:
        """Up to `count` new jobs for `consumer`, waiting at most `block_ms`."""
        reply = await self.redis.xreadgroup(
            JOBS_GROUP, consumer, {self.keys.jobs: ">"}, count=count, block=block_ms
        )
        entries: list[JobEntry] = []
        for _stream, items in reply or []:
            entries.extend(_decode_entry(eid, fields) for eid, fields in items)
        return entries

    async def reclaim(self, consumer: str, min_idle_s: float, count: int) -> list[JobEntry]:
        """Take over up to `count` jobs whose worker has not touched them for `min_idle_s`."""
        reply = await self.redis.xautoclaim(
            self.keys.jobs, JOBS_GROUP, consumer, int(min_idle_s * 1000), "0-0", count=count
        )
        claimed = reply[1] if reply else []
        out = []
        for item in claimed:
            if not item or item[1] is None:  # deleted under us (Redis 6.2 returns nil entries)
                continue
            out.append(_decode_entry(item[0], item[1]))
        return out

    async def touch(self, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of our running jobs so nobody reclaims them."""
        if entry_ids:
            await self.redis.xclaim(self.keys.jobs, JOBS_GROUP, consumer, 0, entry_ids, justid=True)

    async def prune_consumers(self, live: set[str], min_idle_s: float) -> list[str]:
        """Remove the consumers of dead workers from the group: those not in `live`, idle for
        `min_idle_s` and holding no pending entry (their jobs were claimed by others already;
        XGROUP DELCONSUMER would drop pending entries). Returns the names removed."""
        try:
            consumers = await self.redis.xinfo_consumers(self.keys.jobs, JOBS_GROUP)
        except ResponseError:  # no stream or group yet
            return []
        gone = []
        for consumer in consumers:
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name in live or consumer["pending"] or consumer["idle"] < min_idle_s * 1000:
                continue
            await self.redis.xgroup_delconsumer(self.keys.jobs, JOBS_GROUP, name)
            gone.append(name)
        return gone

    async def begin_attempt(self, job_id: str, worker_id: str) -> tuple[int, bool]:
        """Bump the job's fence; returns (attempt, cancelled)."""
        attempt, cancelled = await self._begin(keys=[self.keys.job_meta(job_id)], args=[worker_id])
        return int(attempt), bool(cancelled)

    async def finish(self, entry_id: str) -> None:
        """Acknowledge and delete a finished job's entry."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.keys.jobs, JOBS_GROUP, entry_id)
            pipe.xdel(self.keys.jobs, entry_id)
            await pipe.execute()

    async def dead_letter(self, entry: JobEntry, reason: str) -> None:
        """Move an entry to the dead-letter stream and remove it from the queue."""
        fields = {k: v for k, v in entry.raw.items() if isinstance(k, bytes | str)}
        fields[b"reason"] = reason.encode()
        fields[b"entry_id"] = entry.entry_id.encode()
        await self.redis.xadd(self.keys.dead_letter, fields, maxlen=10_000, approximate=True)
        await self.finish(entry.entry_id)
