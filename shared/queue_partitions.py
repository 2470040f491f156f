"""Read new jobs from several job streams (`--queue-partitions N`) for one consumer.

One stream is one key, so on a Redis Cluster one slot on one shard carries every enqueue,
read, ack and delete of the whole cluster. With N partitions each is its own key (its own
slot); gateways spread jobs over them and every worker reads all of them.

The catch is blocking: XREADGROUP can block on several streams only when they share a slot,
and a worker must never be handed more jobs than it has free slots (an entry it reads is its
own until it acks it). So a read first sweeps the partitions without blocking, from a rotating
start, asking each for what is still missing; only when all are empty does it block, on at most
as many partitions as it has free slots, with COUNT 1 each. Those blocked reads outlive the
call: whatever they deliver later is returned by the next call, and the slots they may fill
stay reserved for them, so the total never exceeds what the worker asked for.
"""

from __future__ import annotations

import asyncio
from typing import Any

from chatstream_cluster.shared.supervise import cancel_and_wait

Entry = tuple[int, Any, Any]  # (partition, entry id, fields)


class PartitionReader:
    """New entries of `streams` for one consumer of `group`."""

    def __init__(self, redis: Any, streams: list[str], group: str) -> None:
        self.redis = redis
        self.streams = streams
        self.group = group
        self._blocked: dict[int, asyncio.Task] = {}  # partition -> its blocked read
        self._start = 0

    async def read(self, consumer: str, count: int, block_ms: int) -> list[Entry]:
        """Up to `count` entries (never more, counting blocked reads still out)."""
        entries = self._harvest()
        room = count - len(entries) - len(self._blocked)
        if room > 0:
            entries += await self._sweep(consumer, room)
        if entries or count <= 0:
            return entries
        room = count - len(self._blocked)
        for p in self._rotation():
            if room <= 0:
                break
            if p not in self._blocked:
                self._blocked[p] = asyncio.create_task(
                    self._xread(p, consumer, 1, block_ms), name=f"job-partition-{p}"
                )
                room -= 1
        if self._blocked:
            await asyncio.wait(
                self._blocked.values(),
                timeout=block_ms / 1000 + 1.0,
                return_when=asyncio.FIRST_COMPLETED,
            )
        return self._harvest()

    async def close(self) -> None:
        """Cancel the blocked reads (an entry one of them got meanwhile stays pending and is
        reclaimed by another worker after `--job-claim-idle`)."""
        tasks = list(self._blocked.values())
        self._blocked.clear()
        await cancel_and_wait(tasks)

    def _rotation(self) -> list[int]:
        n = len(self.streams)
        self._start = (self._start + 1) % n
        return [(self._start + i) % n for i in range(n)]

    async def _sweep(self, consumer: str, room: int) -> list[Entry]:
        found: list[Entry] = []
        for p in self._rotation():
            if len(found) >= room:
                break
            found += await self._xread(p, consumer, room - len(found), None)
        return found

    async def _xread(self, p: int, consumer: str, count: int, block: int | None) -> list[Entry]:
        reply = await self.redis.xreadgroup(
            self.group, consumer, {self.streams[p]: ">"}, count=count, block=block
        )
        return [(p, eid, fields) for _stream, items in reply or [] for eid, fields in items]

    def _harvest(self) -> list[Entry]:
        """Entries of the blocked reads that finished; raises the first error if none had any."""
        entries: list[Entry] = []
        error: BaseException | None = None
        for p, task in list(self._blocked.items()):
            if not task.done():
                continue
            del self._blocked[p]
            if task.cancelled():
                continue
            if task.exception() is not None:
                error = error or task.exception()
                continue
            entries += task.result()
        if error is not None and not entries:
            raise error
        return entries


def parse_ref(ref: str) -> tuple[int, str]:
    """(partition, stream entry id) of an entry reference (`<id>` or `<partition>/<id>`)."""
    partition, slash, entry_id = ref.partition("/")
    return (int(partition), entry_id) if slash else (0, ref)


def make_ref(partition: int, entry_id: bytes | str) -> str:
    """The reference the queue hands out: the plain id in partition 0 (as without partitions),
    `<partition>/<id>` in the others."""
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return eid if partition == 0 else f"{partition}/{eid}"


def group_refs(refs: list[str]) -> dict[int, list[str]]:
    """Entry ids by partition."""
    out: dict[int, list[str]] = {}
    for ref in refs:
        partition, eid = parse_ref(ref)
        out.setdefault(partition, []).append(eid)
    return out

