"""The job queue: a Redis Stream read by the workers' consumer group (at-least-once).

A job's life: the gateway `enqueue`s it (meta hash with attempt 0, then XADD); a worker
reads it (`read`), fences it (`begin_attempt` bumps the attempt), keeps its pending entry
fresh (`touch`) and `finish`es it (XACK + XDEL). Entries of a dead worker go idle and
another worker takes them over with `reclaim` (XAUTOCLAIM).

With `--queue-partitions N` the queue is N streams (shared/queue_partitions.py); an entry id
handed out is then `<partition>/<id>` outside partition 0. On a Redis Cluster the job's meta
hash and its stream entry live in different slots, so they are written one after the other
(meta first) instead of in one MULTI; with Sentinel the writes a failover must not lose are
followed by WAIT (shared/replica_wait.py).
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass

import redis.asyncio as aioredis
from chatstream_cluster.shared.keys import JOBS_GROUP, Keys, safe_id
from chatstream_cluster.shared.queue_partitions import (
    PartitionReader,
    group_refs,
    make_ref,
    parse_ref,
)
from chatstream_cluster.shared.redis_topology import is_cluster
from chatstream_cluster.shared.replica_wait import ReplicaWait, eval_durably
from chatstream_cluster.shared.schemas import ControlMessage, JobSpec
from redis.exceptions import ResponseError

META_TTL_S = 24 * 3600

# Bump the fence and mark the job running; returns {attempt, cancelled}.
_BEGIN_ATTEMPT = """
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1])
local cancelled = redis.call('HGET', KEYS[1], 'cancel')
return {attempt, cancelled and 1 or 0}
"""


# Mark a job queued again to continue it (a client resumed it); the caller then adds its
# entry to the job stream (another slot on a cluster). KEYS: meta. ARGV: packed spec (with the
# resuming gateway's reply channel), meta ttl.
# Returns 0 unknown job, 1 finished (replay only), 2 to queue again.
_RESUBMIT = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
local cancelled = redis.call('HGET', KEYS[1], 'cancel')
if status == 'done' and not cancelled then return 1 end
redis.call('HDEL', KEYS[1], 'cancel')
redis.call('HSET', KEYS[1], 'status', 'queued', 'spec', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 2
"""

UNKNOWN, FINISHED, RESUBMITTED = 0, 1, 2


class PartitionMismatch(ValueError):
    """This process's --queue-partitions differs from the one the others agreed on."""


@dataclass
class JobEntry:
    """A job read from the stream; `spec` is None when the entry could not be decoded."""

    entry_id: str
    spec: JobSpec | None
    raw: dict[bytes, bytes]
    error: str = ""


def _decode_entry(
    entry_id: bytes | str, fields: dict[bytes, bytes] | None, partition: int = 0
) -> JobEntry:
    eid = make_ref(partition, entry_id)
    fields = fields or {}
    try:
        spec = JobSpec.unpack(fields[b"spec"])
        safe_id(spec.job_id)  # a job id that may not reach a key name is garbage too
        return JobEntry(eid, spec, fields)
    except Exception as exc:  # noqa: BLE001 - any garbage must become a dead letter
        return JobEntry(eid, None, fields, error=f"{type(exc).__name__}: {exc}"[:500])


class JobQueue:
    """Producer and consumer side of the job stream(s)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, partitions: int = 1) -> None:
        self.redis = redis
        self.keys = keys
        self.partitions = partitions
        self.streams = [keys.job_stream(i) for i in range(partitions)]
        self._cluster = is_cluster(redis)
        self._begin = redis.register_script(_BEGIN_ATTEMPT)
        self._resubmit = redis.register_script(_RESUBMIT)
        self._reader = PartitionReader(redis, self.streams, JOBS_GROUP) if partitions > 1 else None

    async def ensure_group(self) -> None:
        """Create the stream(s) and the consumer group if missing (idempotent)."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, JOBS_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def check_partitions(self) -> None:
        """Record the partition count under the key prefix, or raise PartitionMismatch when the
        processes already there use another one (jobs would sit where no worker reads)."""
        await self.redis.set(self.keys.queue_partitions, self.partitions, nx=True)
        agreed = int(await self.redis.get(self.keys.queue_partitions) or self.partitions)
        if agreed != self.partitions:
            raise PartitionMismatch(
                f"--queue-partitions {self.partitions}, but the processes on this Redis and key "
                f"prefix use {agreed}. Use {agreed}, or stop them all, delete the key "
                f"{self.keys.queue_partitions!r} and restart with the new number."
            )

    def _stream_of(self, job_id: str) -> tuple[int, str]:
        partition = zlib.crc32(job_id.encode()) % self.partitions if self.partitions > 1 else 0
        return partition, self.streams[partition]

    async def close(self) -> None:
        """Stop the blocked reads of a partitioned queue (the worker's shutdown)."""
        if self._reader is not None:
            await self._reader.close()

    # --- gateway side ----------------------------------------------------------------------
    async def enqueue(self, spec: JobSpec) -> str:
        """Make the job visible to workers; returns the stream entry id."""
        meta = self.keys.job_meta(spec.job_id)
        partition, stream = self._stream_of(spec.job_id)
        packed = spec.pack()
        if self._cluster:  # two slots: the meta hash first, then the entry workers read
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(meta, mapping={"attempt": 0, "status": "queued", "spec": packed})
                pipe.expire(meta, META_TTL_S)
                await pipe.execute()
            return make_ref(partition, await self.redis.xadd(stream, _entry(spec, packed)))
        wait = ReplicaWait.of(self.redis)
        # WAIT may not run inside MULTI: with a WAIT the writes go as a plain pipeline (in
        # order on one connection; only a crash between them can split them).
        async with self.redis.pipeline(transaction=wait is None) as pipe:
            pipe.hset(meta, mapping={"attempt": 0, "status": "queued", "spec": packed})
            pipe.expire(meta, META_TTL_S)
            pipe.xadd(stream, _entry(spec, packed))
            if wait is not None:
                wait.append(pipe)
            result = await pipe.execute()
        if wait is not None:
            wait.note(result.pop())
        return make_ref(partition, result[-1])

    async def stored_spec(self, job_id: str) -> JobSpec | None:
        """The spec a job was enqueued with, while its meta hash lives."""
        packed = await self.redis.hget(self.keys.job_meta(job_id), "spec")
        return JobSpec.unpack(packed) if packed else None

    async def resubmit(self, spec: JobSpec) -> tuple[int, str | None]:
        """Queue a cancelled or unfinished job again so it continues where it stopped.

        Returns (UNKNOWN | FINISHED | RESUBMITTED, entry id)."""
        packed = spec.pack()
        result = int(
            await self._resubmit(keys=[self.keys.job_meta(spec.job_id)], args=[packed, META_TTL_S])
        )
        if result != RESUBMITTED:
            return result, None
        partition, stream = self._stream_of(spec.job_id)
        return result, make_ref(partition, await self.redis.xadd(stream, _entry(spec, packed)))

    async def cancel(self, job_id: str) -> None:
        """Tell the workers to stop a job: a flag they check, and a broadcast."""
        meta = self.keys.job_meta(job_id)
        message = ControlMessage(kind="cancel", job_id=job_id).pack()
        if self._cluster:  # a cluster pipeline takes no PUBLISH
            await asyncio.gather(
                self.redis.hset(meta, "cancel", 1),
                self.redis.publish(self.keys.control_channel, message),
            )
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(meta, "cancel", 1)
            pipe.publish(self.keys.control_channel, message)
            await pipe.execute()

    async def withdraw(self, entry_id: str) -> int:
        """Remove a job no worker has read yet; returns 1 if it was removed."""
        partition, eid = parse_ref(entry_id)
        return await self.redis.xdel(self.streams[partition], eid)

    async def undelivered(self) -> int:
        """Entries no worker has read yet (XLEN minus pending; finished entries are deleted)."""
        total = 0
        for stream in self.streams:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xlen(stream)
                pipe.xpending(stream, JOBS_GROUP)
                try:
                    length, pending = await pipe.execute()
                except ResponseError:  # no stream or group yet
                    continue
            total += max(0, int(length) - int(pending["pending"]))
        return total

    # --- worker side -----------------------------------------------------------------------
    async def read(self, consumer: str, count: int, block_ms: int) -> list[JobEntry]:
        """Up to `count` new jobs for `consumer`, waiting at most `block_ms`.

        A stream or group that vanished (Redis lost its data: a restart without persistence,
        a failover to a replica that had not synced) is created again."""
        try:
            return await self._read(consumer, count, block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            return []

    async def _read(self, consumer: str, count: int, block_ms: int) -> list[JobEntry]:
        if self._reader is not None:
            return [
                _decode_entry(eid, fields, p)
                for p, eid, fields in await self._reader.read(consumer, count, block_ms)
            ]
        reply = await self.redis.xreadgroup(
            JOBS_GROUP, consumer, {self.keys.jobs: ">"}, count=count, block=block_ms
        )
        entries: list[JobEntry] = []
        for _stream, items in reply or []:
            entries.extend(_decode_entry(eid, fields) for eid, fields in items)
        return entries

    async def reclaim(self, consumer: str, min_idle_s: float, count: int) -> list[JobEntry]:
        """Take over up to `count` jobs whose worker has not touched them for `min_idle_s`."""
        out: list[JobEntry] = []
        for partition, stream in enumerate(self.streams):
            if len(out) >= count:
                break
            reply = await self.redis.xautoclaim(
                stream, JOBS_GROUP, consumer, int(min_idle_s * 1000), "0-0",
                count=count - len(out),
            )
            for item in reply[1] if reply else []:
                if not item or item[1] is None:  # deleted under us (Redis 6.2 returns nil)
                    continue
                out.append(_decode_entry(item[0], item[1], partition))
        return out

    async def touch(self, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of our running jobs so nobody reclaims them."""
        for partition, ids in group_refs(entry_ids).items():
            await self.redis.xclaim(
                self.streams[partition], JOBS_GROUP, consumer, 0, ids, justid=True
            )

    async def begin_attempt(self, job_id: str, worker_id: str) -> tuple[int, bool]:
        """Bump the job's fence; returns (attempt, cancelled)."""
        attempt, cancelled = await eval_durably(
            self.redis, self._begin, [self.keys.job_meta(job_id)], [worker_id]
        )
        return int(attempt), bool(cancelled)

    async def finish(self, entry_id: str) -> None:
        """Acknowledge and delete a finished job's entry."""
        partition, eid = parse_ref(entry_id)
        stream = self.streams[partition]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(stream, JOBS_GROUP, eid)
            pipe.xdel(stream, eid)
            await pipe.execute()

    async def dead_letter(self, entry: JobEntry, reason: str) -> None:
        """Move an entry to the dead-letter stream and remove it from the queue."""
        fields = {k: v for k, v in entry.raw.items() if isinstance(k, bytes | str)}
        fields[b"reason"] = reason.encode()
        fields[b"entry_id"] = entry.entry_id.encode()
        await self.redis.xadd(self.keys.dead_letter, fields, maxlen=10_000, approximate=True)
        await self.finish(entry.entry_id)


def _entry(spec: JobSpec, packed: bytes) -> dict[str, bytes | str]:
    return {"spec": packed, "job_id": spec.job_id}
