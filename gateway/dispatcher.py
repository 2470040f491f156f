"""One pub/sub connection and one reader task per gateway process, shared by all its streams.

The gateway subscribes once, at start-up, to its own reply channel; workers publish every
event of this gateway's jobs there. The subscription is confirmed before `start()` returns,
so it exists before any job of this gateway becomes visible to workers: no first token is
lost. Events are routed by job id to the registered `JobInbox`. When the connection drops
(redis-py re-subscribes silently), every inbox is told so it repairs gaps from the job's
event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from redis.exceptions import RedisError

from shared.keys import Keys
from shared.redis_client import REDIS_ERRORS, make_pubsub_redis, reraise_if_cancelling
from shared.schemas import TokenEvent

log = logging.getLogger("chatstream.gateway")


class JobInbox:
    """Events for one job, in arrival order, plus a flag that some may have been lost."""

    __slots__ = ("events", "wakeup", "maybe_lost")

    def __init__(self) -> None:
        self.events: deque[TokenEvent] = deque()
        self.wakeup = asyncio.Event()
        self.maybe_lost = False

    def put(self, event: TokenEvent) -> None:
        self.events.append(event)
        self.wakeup.set()

    def mark_lost(self) -> None:
        self.maybe_lost = True
        self.wakeup.set()


class Dispatcher:
    """Routes this gateway's reply channel to per-job inboxes."""

    def __init__(self, redis_url: str, keys: Keys, gateway_id: str) -> None:
        self.redis_url = redis_url
        self.channel = keys.gateway_channel(gateway_id)
        self.inboxes: dict[str, JobInbox] = {}
        self.connected = asyncio.Event()
        self._client = make_pubsub_redis(redis_url)
        self._pubsub = self._client.pubsub()
        self._task: asyncio.Task | None = None

    async def start(self, timeout: float = 10.0) -> None:
        """Subscribe and wait for the confirmation; then route messages in the background."""
        self._task = asyncio.create_task(self._run(), name="dispatcher")
        await asyncio.wait_for(self.connected.wait(), timeout)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        await self._client.aclose()

    def register(self, job_id: str) -> JobInbox:
        inbox = JobInbox()
        self.inboxes[job_id] = inbox
        return inbox

    def unregister(self, job_id: str) -> None:
        self.inboxes.pop(job_id, None)

    async def _subscribe(self) -> None:
        await self._pubsub.subscribe(self.channel)
        while True:  # wait for the server's confirmation
            msg = await self._pubsub.get_message(timeout=5.0)
            if msg and msg["type"] == "subscribe":
                return
            if msg is None:
                raise TimeoutError("no subscribe confirmation")

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                if not self.connected.is_set():
                    await self._subscribe()
                    self.connected.set()
                    delay = 0.1
                    log.info("dispatcher subscribed", extra={"channel": self.channel})
                await self._route()
            except asyncio.CancelledError:
                raise
            except (*REDIS_ERRORS, RedisError, TimeoutError) as exc:
                reraise_if_cancelling()
                if self.connected.is_set():
                    log.warning("pub/sub connection lost", extra={"error": str(exc)})
                self.connected.clear()
                self._mark_all_lost()
                await self._reset()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _reset(self) -> None:
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        self._pubsub = self._client.pubsub()

    async def _route(self) -> None:
        get = self._pubsub.get_message
        inboxes = self.inboxes
        while True:
            msg = await get(timeout=5.0)
            if msg is None:
                continue
            kind = msg["type"]
            if kind == "message":
                try:
                    event = TokenEvent.unpack(msg["data"])
                except Exception:  # noqa: BLE001
                    log.warning("ignored a malformed event")
                    continue
                inbox = inboxes.get(event.job_id)
                if inbox is not None:
                    inbox.put(event)
            elif kind == "subscribe":  # silently re-subscribed after a reconnect
                self._mark_all_lost()

    def _mark_all_lost(self) -> None:
        for inbox in self.inboxes.values():
            inbox.mark_lost()
