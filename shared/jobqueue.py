"""A served model's job queue: a Redis Stream read by its workers' consumer group
(at-least-once). Every served model has its own (`Keys.job_stream`), so a worker takes only
its own model's jobs and one model's backlog never sits in front of another's.

A job's life: the gateway `enqueue`s it (meta hash with attempt 0, then XADD); a worker
reads it (`read`), fences it (`JobStates.begin_attempt` bumps the attempt, shared/job_state.py),
keeps its pending entry fresh (`touch`) and `finish`es it (XACK + XDEL). Entries of a dead worker
go idle and another worker takes them over with `reclaim` (XAUTOCLAIM). Every entry carries a
nonce; only the entry whose nonce the job's meta names may run (a resume that requeues a parked
job adds an entry with a new nonce), so a job never runs twice at once.

With `--queue-partitions N` the queue is N streams (shared/queue_partitions.py); an entry id
handed out is then `<partition>/<id>` outside partition 0. On a Redis Cluster the job's meta
hash and its stream entry live in different slots, so they are written one after the other
(meta first) instead of in one MULTI; with Sentinel the enqueue is followed by WAIT
(shared/replica_wait.py).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from chatstream_cluster.shared.job_state import META_TTL_S, new_token
from chatstream_cluster.shared.keys import JOBS_GROUP, Keys, safe_id
from chatstream_cluster.shared.queue_partitions import (
    PartitionReader,
    group_refs,
    make_ref,
    parse_ref,
)
from chatstream_cluster.shared.redis_topology import is_cluster
from chatstream_cluster.shared.replica_wait import ReplicaWait
from chatstream_cluster.shared.schemas import ControlMessage, JobSpec


class PartitionMismatch(ValueError):
    """This process's --queue-partitions differs from the one the others agreed on."""


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
    """Producer and consumer side of served model `model`'s job stream(s)."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, *, model: str, partitions: int = 1
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.model = model
        self.partitions = partitions
        self.streams = [keys.job_stream(model, i) for i in range(partitions)]
        self._cluster = is_cluster(redis)
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
    async def enqueue(self, spec: JobSpec, *, owner: str, listener: str) -> str:
        """Make the job visible to workers (meta, then the entry); returns the entry id.

        `owner` may resume it later, `listener` (the connection relaying it) may cancel it;
        workers publish its events to `spec.reply_channel`."""
        nonce = new_token()
        meta = self.keys.job_meta(spec.job_id)
        packed = spec.pack()
        partition, stream = self._stream_of(spec.job_id)
        fields = {
            "attempt": 0, "status": "queued", "spec": packed, "owner": owner,
            "channel": spec.reply_channel, "listener": listener, "nonce": nonce,
        }
        entry = {"spec": packed, "job_id": spec.job_id, "nonce": nonce}
        if self._cluster:  # two slots: the meta hash first, then the entry workers read
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(meta, mapping=fields)
                pipe.expire(meta, META_TTL_S)
                await pipe.execute()
            return make_ref(partition, await self.redis.xadd(stream, entry))
        wait = ReplicaWait.of(self.redis)
        # WAIT may not run inside MULTI: with a WAIT the writes go as a plain pipeline (in
        # order on one connection; only a crash between them can split them).
        async with self.redis.pipeline(transaction=wait is None) as pipe:
            pipe.hset(meta, mapping=fields)
            pipe.expire(meta, META_TTL_S)
            pipe.xadd(stream, entry)
            if wait is not None:
                wait.append(pipe)
            result = await pipe.execute()
        if wait is not None:
            wait.note(result.pop())
        return make_ref(partition, result[-1])

    async def add_entry(self, job_id: str, packed_spec: bytes, nonce: str) -> str:
        """An entry for a job that already has its meta (a resume requeues a parked job: the
        entry becomes the valid one once `JobStates.attach` names its nonce)."""
        partition, stream = self._stream_of(job_id)
        entry = await self.redis.xadd(
            stream, {"spec": packed_spec, "job_id": job_id, "nonce": nonce}
        )
        return make_ref(partition, entry)

    async def broadcast_cancel(self, job_id: str) -> None:
        """Tell the workers to look at a job's cancel flag now (not only at their next write)."""
        await self.redis.publish(
            self.keys.control_channel, ControlMessage(kind="cancel", job_id=job_id).pack()
        )

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
            JOBS_GROUP, consumer, {self.streams[0]: ">"}, count=count, block=block_ms
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

    async def prune_consumers(self, live: set[str], min_idle_s: float) -> list[str]:
        """Remove the consumers of dead workers from the group: those not in `live`, idle for
        `min_idle_s` and holding no pending entry (their jobs were claimed by others already;
        XGROUP DELCONSUMER would drop pending entries). Returns the names removed (once per
        partition they were removed from)."""
        gone = []
        for stream in self.streams:
            try:
                consumers = await self.redis.xinfo_consumers(stream, JOBS_GROUP)
            except ResponseError:  # no stream or group yet
                continue
            for consumer in consumers:
                name = consumer["name"]
                name = name.decode() if isinstance(name, bytes) else str(name)
                if name in live or consumer["pending"] or consumer["idle"] < min_idle_s * 1000:
                    continue
                await self.redis.xgroup_delconsumer(stream, JOBS_GROUP, name)
                gone.append(name)
        return gone

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
