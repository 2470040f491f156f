"""Everything one gateway process holds: its Redis pool, dispatcher, admission and caches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from typing import Any

from redis.exceptions import RedisError

from chatstream_cluster.gateway.admission import Admission
from chatstream_cluster.gateway.dispatcher import Dispatcher
from chatstream_cluster.gateway.workers import WorkerCache
from chatstream_cluster.shared.cluster_status import cluster_status
from chatstream_cluster.shared.jobqueue import JobQueue
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.redis_client import REDIS_ERRORS, make_redis, reraise_if_cancelling
from chatstream_cluster.shared.registry import GatewayRegistry, WorkerRegistry
from chatstream_cluster.shared.schemas import GatewayInfo
from chatstream_cluster.shared.semaphore import RedisSemaphore
from chatstream_cluster.shared.settings import GatewaySettings

log = logging.getLogger("chatstream.gateway")

# Waiting for a pooled connection in a burst is queueing, not an outage: allowed longer than
# one command (--redis-timeout), which bounds how long a frozen Redis holds each connection.
REDIS_POOL_WAIT_S = 5.0
GATEWAY_HEARTBEAT_S = 1.0
GATEWAY_TTL_S = 5.0


class GatewayState:
    """Process-wide objects of a gateway, created at start-up and closed at shutdown."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.gateway_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.started_ms = int(time.time() * 1000)
        self.redis = make_redis(settings.redis_url, socket_timeout=settings.redis_timeout,
                                pool_timeout=REDIS_POOL_WAIT_S)
        self.queue = JobQueue(self.redis, self.keys)
        self.registry = WorkerRegistry(self.redis, self.keys)
        self.gateways = GatewayRegistry(self.redis, self.keys)
        self.workers = WorkerCache(self.registry)
        self.semaphore = RedisSemaphore(self.redis, self.keys, lease_s=settings.permit_lease)
        self.admission = Admission(self.semaphore, settings, self.workers, self.keys)
        self.dispatcher = Dispatcher(settings.redis_url, self.keys, self.gateway_id)
        self.background: set[asyncio.Task] = set()
        self.draining = False  # refusing new generations (shutting down)
        self.leaving = False  # SIGTERM seen: /readyz 503, still serving (--shutdown-grace)
        self._heartbeat_task: asyncio.Task | None = None

    def served_models(self) -> list[str]:
        """Model names requests may ask for: the live workers' models and the configured alias."""
        names = self.workers.models
        if self.settings.served_model_name and names:
            names = sorted({*names, self.settings.served_model_name})
        return names

    def info(self) -> GatewayInfo:
        """This gateway's registry entry."""
        s = self.settings
        return GatewayInfo(
            id=self.gateway_id, pid=os.getpid(), host=socket.gethostname(),
            max_concurrent=s.max_concurrent, max_queue=s.max_queue,
            started_ms=self.started_ms, draining=self.draining,
        )

    async def cluster_status(self) -> dict[str, Any]:
        """The cluster-wide status (shared/cluster_status.py); raises Redis errors."""
        return await cluster_status(self.redis, self.keys)

    async def start(self) -> None:
        await self.dispatcher.start()
        await self.workers.start()
        await self.admission.start()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="gw-heartbeat")

    async def stop(self) -> None:
        self.draining = True
        if self.background:
            await asyncio.wait(self.background, timeout=10)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        with contextlib.suppress(*REDIS_ERRORS, RedisError):
            await self.gateways.remove(self.gateway_id)
        await self.admission.stop()
        await self.workers.stop()
        await self.dispatcher.stop()
        await self.redis.aclose()

    async def _heartbeat_loop(self) -> None:
        """Publish this gateway's entry (and so its capacity) in the gateway registry."""
        while True:
            try:
                await self.gateways.heartbeat(self.info(), GATEWAY_TTL_S)
            except (*REDIS_ERRORS, RedisError) as exc:
                reraise_if_cancelling()
                log.debug("gateway heartbeat failed", extra={"error": str(exc)})
            await asyncio.sleep(GATEWAY_HEARTBEAT_S)
