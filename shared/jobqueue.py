"""The job queue: a Redis Stream read by the workers' consumer group (at-least-once).

A job's life: the gateway `enqueue`s it (meta hash with attempt 0, then XADD); a worker
reads it (`read`), fences it (`JobStates.begin_attempt` bumps the attempt, shared/job_state.py),
keeps its pending entry fresh (`touch`) and `finish`es it (XACK + XDEL). Entries of a dead worker
go idle and another worker takes them over with `reclaim` (XAUTOCLAIM). Every entry carries a
nonce; only the entry whose nonce the job's meta names may run (a resume that requeues a parked
job adds an entry with a new nonce), so a job never runs twice at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from chatstream_cluster.shared.job_state import META_TTL_S, new_token
from chatstream_cluster.shared.keys import JOBS_GROUP, Keys, safe_id
from chatstream_cluster.shared.schemas import ControlMessage, JobSpec


@dataclass
class JobEntry:
    """A job read from the stream; `spec` is None when the entry could not be decoded."""

    entry_id: str
    spec: JobSpec | None
    raw: dict[bytes, bytes]
    error: str = ""

    @property
    def nonce(self) -> str:
        """The entry's nonce ('' for an entry without one)."""
        return self.raw.get(b"nonce", b"").decode(errors="replace")


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

    async def ensure_group(self) -> None:
        """Create the stream and the consumer group if missing (idempotent)."""
        try:
            await self.redis.xgroup_create(self.keys.jobs, JOBS_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # --- gateway side ----------------------------------------------------------------------
    async def enqueue(self, spec: JobSpec, *, owner: str, listener: str) -> str:
        """Make the job visible to workers (meta, then the entry); returns the entry id.

        `owner` may resume it later, `listener` (the connection relaying it) may cancel it;
        workers publish its events to `spec.reply_channel`."""
        nonce = new_token()
        meta = self.keys.job_meta(spec.job_id)
        packed = spec.pack()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(meta, mapping={
                "attempt": 0, "status": "queued", "spec": packed, "owner": owner,
                "channel": spec.reply_channel, "listener": listener, "nonce": nonce,
            })
            pipe.expire(meta, META_TTL_S)
            pipe.xadd(self.keys.jobs, {"spec": packed, "job_id": spec.job_id, "nonce": nonce})
            result = await pipe.execute()
        return _text(result[-1])

    async def add_entry(self, job_id: str, packed_spec: bytes, nonce: str) -> str:
        """An entry for a job that already has its meta (a resume requeues a parked job: the
        entry becomes the valid one once `JobStates.attach` names its nonce)."""
        entry = await self.redis.xadd(
            self.keys.jobs, {"spec": packed_spec, "job_id": job_id, "nonce": nonce}
        )
        return _text(entry)

    async def broadcast_cancel(self, job_id: str) -> None:
        """Tell the workers to look at a job's cancel flag now (not only at their next write)."""
        await self.redis.publish(
            self.keys.control_channel, ControlMessage(kind="cancel", job_id=job_id).pack()
        )

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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
