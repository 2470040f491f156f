"""Everything one gateway process holds: its Redis pool, dispatcher, admission and caches."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid

from chatstream_cluster.gateway.admission import Admission
from chatstream_cluster.gateway.dispatcher import Dispatcher
from chatstream_cluster.gateway.sharded_dispatcher import ShardedDispatcher
from chatstream_cluster.gateway.workers import WorkerCache
from chatstream_cluster.shared.jobqueue import JobQueue
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.redis_client import make_redis
from chatstream_cluster.shared.redis_topology import is_cluster
from chatstream_cluster.shared.registry import WorkerRegistry
from chatstream_cluster.shared.semaphore import RedisSemaphore
from chatstream_cluster.shared.sentinel_watch import sentinel_watch
from chatstream_cluster.shared.settings import GatewaySettings


class GatewayState:
    """Process-wide objects of a gateway, created at start-up and closed at shutdown."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.gateway_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.redis = make_redis(settings.redis_url)
        self.queue = JobQueue(self.redis, self.keys, partitions=settings.queue_partitions)
        self.registry = WorkerRegistry(self.redis, self.keys)
        self.workers = WorkerCache(self.registry)
        self.semaphore = RedisSemaphore(self.redis, self.keys, lease_s=settings.permit_lease)
        self.admission = Admission(self.semaphore, settings, self.workers)
        self.dispatcher: Dispatcher | ShardedDispatcher
        if is_cluster(self.redis):
            self.dispatcher = ShardedDispatcher(self.redis, self.keys)
        else:
            self.dispatcher = Dispatcher(settings.redis_url, self.keys, self.gateway_id)
        self.sentinel_watch = sentinel_watch(settings.redis_url, [self._reconnect_dispatcher])
        self.background: set[asyncio.Task] = set()
        self._watch_task: asyncio.Task | None = None
        self.draining = False

    def served_models(self) -> list[str]:
        """Model names requests may ask for: the live workers' models and the configured alias."""
        names = self.workers.models
        if self.settings.served_model_name and names:
            names = sorted({*names, self.settings.served_model_name})
        return names

    def _reconnect_dispatcher(self) -> None:
        if isinstance(self.dispatcher, Dispatcher):
            self.dispatcher.reconnect()

    async def start(self) -> None:
        await self.queue.check_partitions()
        await self.dispatcher.start()
        await self.workers.start()
        await self.admission.start()
        if self.sentinel_watch is not None:
            self._watch_task = asyncio.create_task(self.sentinel_watch.run(), name="sentinel")

    async def stop(self) -> None:
        self.draining = True
        if self.background:
            await asyncio.wait(self.background, timeout=10)
        if self._watch_task is not None:
            self._watch_task.cancel()
        await self.admission.stop()
        await self.workers.stop()
        await self.dispatcher.stop()
        await self.redis.aclose()
