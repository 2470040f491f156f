"""One pub/sub connection and one reader task per gateway process, shared by all its streams.

The gateway subscribes once, at start-up, to its own reply channel; workers publish every
event of this gateway's jobs there. The subscription is confirmed before `start()` returns,
so it exists before any job of this gateway becomes visible to workers: no first token is
lost. Events are routed by job id to the registered `JobInbox`. When the connection drops,
every inbox is told (at the drop and again once subscribed anew) so it repairs gaps from the
job's event stream.

The hot path is one socket read for all the messages that arrived meanwhile: redis-py opens
the connection (URL, TLS, AUTH exactly as for the process's other clients), then the
dispatcher reads the subscribed socket itself and parses the replies in bulk with hiredis —
about 0.5 us per message instead of ~12 us for one `PubSub.get_message` call per message. A
quiet connection is PINGed; one that stays silent is closed and opened again.

With Sentinel the connection goes to the current primary (asked of the sentinels at each
connect) and `reconnect()` moves it after a failover (shared/sentinel_watch.py). On a Redis
Cluster, gateway/sharded_dispatcher.py takes this module's place (gateway/state.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.redis_topology import make_pubsub_pool
from chatstream_cluster.shared.schemas import TokenEvent
from chatstream_cluster.shared.waits import wait_set

log = logging.getLogger("chatstream.gateway")

READ_SIZE = 1 << 16
PING_AFTER_S = 5.0  # nothing read for this long: PING the server
DEAD_AFTER_S = 12.0  # nothing read (not even the PONG) for this long: reconnect
CONNECT_TIMEOUT_S = 5.0


class JobInbox:
    """Events for one job, in arrival order, plus a flag that some may have been lost."""

    __slots__ = ("events", "maybe_lost", "_waiter", "_deadline", "_timer")

    def __init__(self) -> None:
        self.events: deque[TokenEvent] = deque()
        self.maybe_lost = False
        self._waiter: asyncio.Future[bool] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def put(self, event: TokenEvent) -> None:
        self.events.append(event)
        self._wake()

    def mark_lost(self) -> None:
        self.maybe_lost = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    async def wait(self, timeout: float) -> bool:
        """True as soon as an event is queued or a loss is flagged; False after `timeout`.

        Cheap per event: one future, no task (unlike `asyncio.wait_for`) and usually no new
        timer: the inbox's one timer stays armed across waits and, when it fires early for
        the current wait, is set again for that wait's deadline."""
        if self.events or self.maybe_lost:
            return True
        loop = asyncio.get_running_loop()
        self._deadline = deadline = loop.time() + timeout
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timer)
        waiter = self._waiter = loop.create_future()
        try:
            return await waiter
        finally:
            self._waiter = None

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: stay disarmed until the next wait
        loop = waiter.get_loop()
        if loop.time() + 0.001 >= self._deadline:
            waiter.set_result(False)
        else:
            self._timer = loop.call_at(self._deadline, self._on_timer)

    def close(self) -> None:
        """Disarm the timer (the job is done with this inbox)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None



async def keep_alive(
    writer: asyncio.StreamWriter,
    last_read: Callable[[], float],
    before_ping: Callable[[], None] | None = None,
) -> None:
    """PING a quiet subscribed connection; abort one that answers nothing (a half-open
    socket), so its reader ends and the connection is made again. `last_read()` is the loop
    time of the last bytes read; `before_ping()` runs before each PING is written."""
    loop = asyncio.get_running_loop()
    ping = hiredis.pack_command(("PING",))
    while True:
        await asyncio.sleep(PING_AFTER_S / 2)
        quiet = loop.time() - last_read()
        if quiet > DEAD_AFTER_S:
            log.warning("pub/sub connection silent: reconnecting", extra={"quiet_s": quiet})
            writer.transport.abort()
            return
        if quiet > PING_AFTER_S:
            if before_ping is not None:
                before_ping()
            writer.write(ping)


def deliver(payload: bytes, inboxes: dict[str, JobInbox]) -> None:
    """Route one published event to its job's inbox (a malformed one is logged and dropped)."""
    try:
        event = TokenEvent.unpack(payload)
    except Exception:  # noqa: BLE001 - a bad message must not stop the routing
        log.warning("ignored a malformed event")
        return
    inbox = inboxes.get(event.job_id)
    if inbox is not None:
        inbox.put(event)


class _Refused(ConnectionError):
    """Redis answered the subscription with an error."""


class Dispatcher:
    """Routes this gateway's reply channel to per-job inboxes."""

    def __init__(self, redis_url: str, keys: Keys, gateway_id: str) -> None:
        self.redis_url = redis_url
        self.channel = keys.gateway_channel(gateway_id)
        self.inboxes: dict[str, JobInbox] = {}
        self.connected = asyncio.Event()
        self._pool = make_pubsub_pool(redis_url, CONNECT_TIMEOUT_S)
        self._writer: asyncio.StreamWriter | None = None
        self._last_read = 0.0

    async def wait_connected(self, timeout: float) -> bool:
        """True once subscribed (confirmed); False after `timeout` seconds without."""
        return await wait_set(self.connected, timeout)

    async def stop(self) -> None:
        """Close the connection pool (`run` is cancelled by its supervisor first)."""
        await self._pool.aclose()

    def reply_channel(self, job_id: str) -> str:  # noqa: ARG002 - one channel for all jobs
        """Where workers publish `job_id`'s events: this gateway's channel."""
        return self.channel

    async def register(self, job_id: str) -> JobInbox:
        """Route the job's events to a new inbox (a later registration of the same job — a
        resume on this gateway — takes them over). The channel is subscribed already, since
        start-up (async for the cluster's dispatcher, which subscribes per job)."""
        inbox = JobInbox()
        self.inboxes[job_id] = inbox
        return inbox

    def reconnect(self) -> None:
        """Drop the connection; `run` connects again (to the new primary after a failover)."""
        if self._writer is not None:
            self._writer.transport.abort()

    def unregister(self, job_id: str, inbox: JobInbox) -> None:
        """Stop routing to `inbox` (if the job's events still go there)."""
        if self.inboxes.get(job_id) is inbox:
            del self.inboxes[job_id]
        inbox.close()

    async def run(self) -> None:
        """Subscribe, route, and on any connection loss subscribe again (with backoff) and
        tell every inbox to repair; forever (a supervised task)."""
        delay = 0.1
        subscribed_before = False
        while True:
            conn = self._pool.make_connection()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    reader, writer, parser = await self._subscribe(conn)
                self.connected.set()
                delay = 0.1
                log.info("dispatcher subscribed", extra={"channel": self.channel})
                if subscribed_before:  # what was published while unsubscribed is lost
                    self._mark_all_lost()
                subscribed_before = True
                await self._route(reader, writer, parser)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever broke, reconnect and repair
                if not isinstance(exc, OSError | EOFError | hiredis.ProtocolError | RedisError):
                    log.exception("dispatcher failed: reconnecting")
                elif self.connected.is_set() or isinstance(exc, _Refused):
                    log.warning("pub/sub connection lost", extra={"error": str(exc)})
                self.connected.clear()
                self._mark_all_lost()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                self._writer = None
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)

    async def _subscribe(
        self, conn: aioredis.Connection
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, hiredis.Reader]:
        """Connect (redis-py: TLS, AUTH, ...), SUBSCRIBE, and wait for the confirmation."""
        await conn.connect()
        reader, writer = conn._reader, conn._writer  # noqa: SLF001 - read the socket ourselves
        if not isinstance(reader, asyncio.StreamReader) or writer is None:
            raise RuntimeError("this redis-py version keeps no asyncio streams on a connection")
        parser = hiredis.Reader()
        writer.write(hiredis.pack_command(("SUBSCRIBE", self.channel)))
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                raise ConnectionError("closed while subscribing")
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise _Refused(str(reply))
                if isinstance(reply, list) and reply[:1] == [b"subscribe"]:
                    self._writer = writer
                    return reader, writer, parser  # messages right behind it stay in `parser`

    async def _route(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, parser: hiredis.Reader
    ) -> None:
        """Read what arrived, parse every complete reply, route each event; until the socket
        closes or goes silent."""
        loop = asyncio.get_running_loop()
        self._last_read = loop.time()
        watchdog = asyncio.create_task(self._watch(writer), name="dispatcher-watchdog")
        inboxes = self.inboxes
        try:
            while True:
                while (reply := parser.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise _Refused(str(reply))
                    if isinstance(reply, list) and reply[0] == b"message":
                        deliver(reply[2], inboxes)
                    # anything else is the PONG of the watchdog's PING
                data = await reader.read(READ_SIZE)
                if not data:
                    raise ConnectionError("pub/sub connection closed")
                self._last_read = loop.time()
                parser.feed(data)
        finally:
            watchdog.cancel()

    async def _watch(self, writer: asyncio.StreamWriter) -> None:
        await keep_alive(writer, lambda: self._last_read)

    def _mark_all_lost(self) -> None:
        for inbox in self.inboxes.values():
            inbox.mark_lost()
