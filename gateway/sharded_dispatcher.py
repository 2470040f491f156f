"""The dispatcher on a Redis Cluster: one sharded channel per job, one connection per shard.

Classic PUBLISH on a cluster is broadcast to every node, so more shards would add no pub/sub
capacity. Each job instead gets its own sharded channel in its own slot (`Keys.job_channel`),
and the worker's fenced publish SPUBLISHes there in the same script that checks the fence and
stores the event (shared/events.py): the message stays on the shard that owns the job.

The channel is per job *and* per gateway (`Keys.job_channel(job, gateway)`, still in the job's
slot): the job's meta names the channel of the gateway relaying it now, so a resume through
another gateway moves the events there, exactly as on one node.

Why per job, not a few channels per gateway: the channel must share the job's slot for the
script to publish to it atomically, so a per-gateway channel would force every job id into one
of that gateway's slots. Job ids would have to be mined for a slot, a client resuming the job on
another gateway would need a subscription in that slot anyway, and a migrated slot would take a
gateway's whole share of jobs with it. A per-job SSUBSCRIBE costs about what one PUBLISH costs
on the server and one round trip on the job's start (figures in docs/operations.md).

The no-lost-first-token guarantee holds as on one node: `register()` returns only once the
shard confirmed the SSUBSCRIBE, and the job is enqueued after that. A subscription can end
from the server's side: the slot moved (a migration, a failover) and the old owner sends
`sunsubscribe`, or the connection dropped. The job's inbox is then told at once, the relay
repairs from the job's event stream (it also polls it every second while the job is silent),
and the channel is subscribed again on the slot's current owner (the slot map is refreshed
first); once that is confirmed the inbox is told again, to pick up what was sent meanwhile.

redis-py 8's `ClusterPubSub` does the routing and the re-subscription too, but it reads one
node at a time through `get_message` (~12 us per message); this module reads each shard's
socket in bulk with hiredis exactly as gateway/dispatcher.py does on one node (~0.5 us), and it
uses redis-py's cluster client for the slot map and to open connections (TLS, AUTH).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import hiredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from chatstream_cluster.gateway.dispatcher import (
    CONNECT_TIMEOUT_S,
    READ_SIZE,
    JobInbox,
    deliver,
    keep_alive,
)
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS, reraise_if_cancelling
from chatstream_cluster.shared.waits import wait_set

log = logging.getLogger("chatstream.gateway")

SUBSCRIBE_TRIES = 3
REHOME_MAX_DELAY_S = 2.0


class _Refused(RedisConnectionError):
    """The shard answered SSUBSCRIBE with an error (MOVED: the slot lives elsewhere now)."""


class _ShardLink:
    """One subscribed connection to one primary, read by its own task."""

    def __init__(self, owner: ShardedDispatcher, node: ClusterNode) -> None:
        self.owner = owner
        self.name = node.name
        self.node = node
        self.channels: set[bytes] = set()
        # Replies owed by the server, in order: (kind, channel, future of a subscribe).
        self._owed: deque[tuple[bytes, bytes | None, asyncio.Future | None]] = deque()
        self._writer: asyncio.StreamWriter | None = None
        self._ready = asyncio.Event()
        self._closed = False
        self._last_read = 0.0
        self.task = asyncio.create_task(self._run(), name=f"shard-link-{node.name}")

    # --- commands --------------------------------------------------------------------------
    async def subscribe(self, channel: bytes) -> None:
        """SSUBSCRIBE and wait for the confirmation."""
        await self._ready.wait()
        if self._closed or self._writer is None:
            raise RedisConnectionError(f"connection to {self.name} lost")
        future = asyncio.get_running_loop().create_future()
        self._owed.append((b"ssubscribe", channel, future))
        self._writer.write(hiredis.pack_command(("SSUBSCRIBE", channel)))
        await future

    def unsubscribe(self, channel: bytes) -> None:
        """SUNSUBSCRIBE without waiting (the job is done with its channel)."""
        if channel in self.channels and self._writer is not None and not self._closed:
            self.channels.discard(channel)
            self._owed.append((b"sunsubscribe", channel, None))
            self._writer.write(hiredis.pack_command(("SUNSUBSCRIBE", channel)))

    def close(self) -> None:
        self._closed = True
        self.task.cancel()

    # --- the connection --------------------------------------------------------------------
    async def _run(self) -> None:
        conn = self.node.connection_class(**{**self.node.connection_kwargs, "socket_timeout": None})
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await conn.connect()
            reader, writer = conn._reader, conn._writer  # noqa: SLF001 - read the socket ourselves
            if not isinstance(reader, asyncio.StreamReader) or writer is None:
                raise RuntimeError("this redis-py version keeps no asyncio streams on a connection")
            self._writer = writer
            self._ready.set()
            await self._read(reader, writer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever broke, the owner re-homes our jobs
            if not self._closed:
                log.warning("shard pub/sub connection lost", extra={"node": self.name,
                                                                   "error": str(exc)})
        finally:
            self._closed = True
            self._ready.set()  # subscribers waiting for the connection fail at once
            for _kind, _channel, future in self._owed:
                if future is not None and not future.done():
                    future.set_exception(RedisConnectionError(f"connection to {self.name} lost"))
            self._owed.clear()
            self.owner._link_lost(self)
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        self._last_read = loop.time()
        parser = hiredis.Reader()
        watchdog = asyncio.create_task(self._watch(writer), name=f"shard-watchdog-{self.name}")
        inboxes = self.owner.inboxes
        try:  # the routing is inline, as in dispatcher.py: it runs for every message
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    raise ConnectionError("pub/sub connection closed")
                self._last_read = loop.time()
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    if isinstance(reply, list) and reply[0] == b"smessage":
                        deliver(reply[2], inboxes)
                    else:
                        self._on_reply(reply)
        finally:
            watchdog.cancel()

    def _on_reply(self, reply: Any) -> None:
        """A subscribe/unsubscribe confirmation, a PONG, an error, or the server dropping one
        of our channels (its slot moved)."""
        kind = reply[0] if isinstance(reply, list) and reply else None
        channel = reply[1] if isinstance(reply, list) and len(reply) > 1 else None
        owed = self._owed[0] if self._owed else None
        if kind == b"sunsubscribe" and (owed is None or owed[:2] != (kind, channel)):
            self.channels.discard(channel)  # not ours to expect: the slot left this node
            self.owner._lost_channel(channel)
            return
        if owed is None:
            return
        self._owed.popleft()
        _kind, owed_channel, future = owed
        if isinstance(reply, hiredis.ReplyError):
            if future is not None and not future.done():
                future.set_exception(_Refused(str(reply)))
            return
        if kind == b"ssubscribe" and future is not None:
            self.channels.add(owed_channel)
            if future.done() or owed_channel not in self.owner._jobs_of:
                self.unsubscribe(owed_channel)  # its job gave up waiting meanwhile
            else:
                future.set_result(True)

    async def _watch(self, writer: asyncio.StreamWriter) -> None:
        await keep_alive(writer, lambda: self._last_read,
                         lambda: self._owed.append((b"pong", None, None)))


class ShardedDispatcher:
    """Routes the sharded channels of this gateway's jobs to per-job inboxes."""

    def __init__(self, cluster: RedisCluster, keys: Keys, gateway_id: str) -> None:
        self.cluster = cluster
        self.keys = keys
        self.gateway_id = gateway_id
        self.inboxes: dict[str, JobInbox] = {}
        self.connected = asyncio.Event()
        self._links: dict[str, _ShardLink] = {}
        self._jobs_of: dict[bytes, str] = {}  # channel -> job id
        self._homeless: set[str] = set()  # jobs whose channel must be subscribed again
        self._rehome_wake = asyncio.Event()

    async def wait_connected(self, timeout: float) -> bool:
        """True once the slot map is known (jobs can subscribe); False after `timeout`."""
        return await wait_set(self.connected, timeout)

    async def run(self) -> None:
        """Learn the slot map (retrying while the cluster is unreachable), then keep the
        subscriptions where their slots are; forever (a supervised task)."""
        delay = 0.1
        while not self.connected.is_set():
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await self.cluster.initialize()
                self.connected.set()
            except (*TRANSIENT_REDIS_ERRORS, OSError, TimeoutError) as exc:
                reraise_if_cancelling()
                log.warning("redis cluster unreachable: retrying", extra={"error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, REHOME_MAX_DELAY_S)
        await self._rehome_loop()

    async def stop(self) -> None:
        """Close every shard connection (`run` is cancelled by its supervisor first)."""
        links = list(self._links.values())
        for link in links:
            link.close()
        await asyncio.gather(*(link.task for link in links), return_exceptions=True)

    def reply_channel(self, job_id: str) -> str:
        """The job's channel for this gateway (in the job's slot)."""
        return self.keys.job_channel(job_id, self.gateway_id)

    async def register(self, job_id: str) -> JobInbox:
        """Route the job's events to a new inbox, once the shard confirmed the subscription of
        the job's channel (a later registration of the same job — a resume on this gateway —
        takes them over)."""
        inbox = JobInbox()
        self.inboxes[job_id] = inbox
        channel = self.reply_channel(job_id).encode()
        self._jobs_of[channel] = job_id
        try:
            await self._subscribe(channel)
        except BaseException:
            self.unregister(job_id, inbox)
            raise
        return inbox

    def unregister(self, job_id: str, inbox: JobInbox) -> None:
        """Stop routing to `inbox` (if the job's events still go there), and unsubscribe."""
        inbox.close()
        if self.inboxes.get(job_id) is not inbox:
            return  # a later registration of the job uses the channel now
        del self.inboxes[job_id]
        channel = self.reply_channel(job_id).encode()
        self._jobs_of.pop(channel, None)
        self._homeless.discard(job_id)
        for link in self._links.values():
            link.unsubscribe(channel)

    # --- subscriptions ---------------------------------------------------------------------
    async def _subscribe(self, channel: bytes) -> None:
        """SSUBSCRIBE on the slot's owner; on MOVED or a lost connection refresh the slot map
        and try again."""
        for attempt in range(SUBSCRIBE_TRIES):
            node = self.cluster.get_node_from_key(channel)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await self._link(node).subscribe(channel)
                return
            except (RedisConnectionError, OSError, TimeoutError) as exc:
                if attempt == SUBSCRIBE_TRIES - 1:
                    raise RedisConnectionError(f"cannot subscribe on {node.name}: {exc}") from exc
                await self._refresh_slots()

    def _link(self, node: ClusterNode) -> _ShardLink:
        link = self._links.get(node.name)
        if link is None:
            link = self._links[node.name] = _ShardLink(self, node)
        return link

    async def _refresh_slots(self) -> None:
        await self.cluster.nodes_manager.initialize()

    def _link_lost(self, link: _ShardLink) -> None:
        if self._links.get(link.name) is link:
            del self._links[link.name]
        for channel in link.channels:
            self._lost_channel(channel)
        link.channels.clear()

    def _lost_channel(self, channel: bytes) -> None:
        job_id = self._jobs_of.get(channel)
        inbox = self.inboxes.get(job_id) if job_id else None
        if inbox is None:
            return
        inbox.mark_lost()  # repair from the stream now; subscribed again below
        self._homeless.add(job_id)
        self._rehome_wake.set()

    async def _rehome_loop(self) -> None:
        """Subscribe lost channels again where their slots live now, with backoff."""
        delay = 0.05
        while True:
            await self._rehome_wake.wait()
            self._rehome_wake.clear()
            try:
                await self._refresh_slots()
                jobs = [j for j in self._homeless if j in self.inboxes]
                results = await asyncio.gather(
                    *(self._rehome(j) for j in jobs), return_exceptions=True
                )
                failed = [r for r in results if isinstance(r, BaseException)]
                if failed:
                    raise failed[0]
                delay = 0.05
                self._close_stray_links()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep trying; the relay polls meanwhile
                log.warning("re-subscribing moved job channels failed; retrying",
                            extra={"error": str(exc), "jobs": len(self._homeless)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, REHOME_MAX_DELAY_S)
                self._rehome_wake.set()

    async def _rehome(self, job_id: str) -> None:
        await self._subscribe(self.reply_channel(job_id).encode())
        self._homeless.discard(job_id)
        inbox = self.inboxes.get(job_id)
        if inbox is not None:
            inbox.mark_lost()  # what was published while unsubscribed is in the stream
            log.info("job channel subscribed again", extra={"job_id": job_id})

    def _close_stray_links(self) -> None:
        """Close idle links to nodes that are no longer primaries."""
        primaries = {n.name for n in self.cluster.get_primaries()}
        for name, link in list(self._links.items()):
            if name not in primaries and not link.channels:
                del self._links[name]
                link.close()
