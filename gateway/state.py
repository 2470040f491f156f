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

from chatstream_cluster.gateway.admission import Admission
from chatstream_cluster.gateway.dispatcher import Dispatcher
from chatstream_cluster.gateway.metrics import TASK_FAILURES
from chatstream_cluster.gateway.ops_recorder import OpsRecorder
from chatstream_cluster.gateway.sharded_dispatcher import ShardedDispatcher
from chatstream_cluster.gateway.workers import WorkerCache
from chatstream_cluster.shared.cluster_status import cluster_status
from chatstream_cluster.shared.job_state import JobStates
from chatstream_cluster.shared.jobqueue import JobQueue
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.ops_stats import OpsStats
from chatstream_cluster.shared.redis_client import make_redis
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS, reraise_if_cancelling
from chatstream_cluster.shared.redis_topology import is_cluster
from chatstream_cluster.shared.registry import GatewayRegistry, WorkerRegistry
from chatstream_cluster.shared.schemas import GatewayInfo
from chatstream_cluster.shared.semaphore import RedisSemaphore
from chatstream_cluster.shared.sentinel_watch import sentinel_watch
from chatstream_cluster.shared.settings import GatewaySettings
from chatstream_cluster.shared.supervise import Supervisor

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
        self.queue = JobQueue(self.redis, self.keys, partitions=settings.queue_partitions)
        self.states = JobStates(self.redis, self.keys)
        self.registry = WorkerRegistry(self.redis, self.keys)
        self.gateways = GatewayRegistry(self.redis, self.keys)
        self.workers = WorkerCache(self.registry)
        self.semaphore = RedisSemaphore(self.redis, self.keys, lease_s=settings.permit_lease)
        self.admission = Admission(self.semaphore, settings, self.workers, self.keys)
        self.dispatcher: Dispatcher | ShardedDispatcher
        if is_cluster(self.redis):  # one sharded channel per job (docs/operations.md)
            self.dispatcher = ShardedDispatcher(self.redis, self.keys, self.gateway_id)
        else:
            self.dispatcher = Dispatcher(settings.redis_url, self.keys, self.gateway_id)
        # Sentinel: follow a failover at once (shared/sentinel_watch.py).
        self.sentinel_watch = sentinel_watch(settings.redis_url, [self._reconnect_dispatcher])
        self.ops_stats = OpsStats(self.redis, self.keys)
        self.ops_recorder = OpsRecorder(self.ops_stats, self.semaphore, self.queue)
        self.background: set[asyncio.Task] = set()  # per-request cleanups
        self.supervisor = Supervisor(lambda name, _exc: TASK_FAILURES.labels(task=name).inc())
        self.draining = False  # refusing new generations (shutting down)
        self.leaving = False  # SIGTERM seen: /readyz 503, still serving (--shutdown-grace)

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

    def _reconnect_dispatcher(self) -> None:
        if isinstance(self.dispatcher, Dispatcher):
            self.dispatcher.reconnect()

    async def cluster_status(self) -> dict[str, Any]:
        """The cluster-wide status (shared/cluster_status.py); raises Redis errors."""
        return await cluster_status(self.redis, self.keys)

    async def start(self) -> None:
        """Run the background tasks, each supervised (shared/supervise.py): a crash is logged
        and restarted, and `/readyz` is 503 while a task is down. Nothing here waits for Redis:
        a gateway whose Redis is not up yet serves `/healthz` and answers 503 elsewhere until
        it is (`ready()` says when)."""
        sup = self.supervisor
        sup.start("dispatcher", self.dispatcher.run)
        if self.sentinel_watch is not None:
            sup.start("sentinel-watch", self.sentinel_watch.run)
        sup.start("worker-cache", self.workers.refresh_loop)
        sup.start("permit-refresh", self.admission.refresh_loop)
        sup.start("gateway-heartbeat", self._heartbeat_loop)
        sup.start("ops-recorder", self.ops_recorder.run)
        sup.start("queue-partitions", self._check_queue_partitions)

    def ready(self) -> dict[str, Any]:
        """Readiness: Redis answers, a worker is live, no background task is down, not
        draining, and no SIGTERM seen (not ready during --shutdown-grace, still serving)."""
        down = dict(self.supervisor.down)
        leaving = self.leaving or self.draining
        ok = (self.workers.fresh() and bool(self.workers.serving) and not leaving
              and not down and self.dispatcher.connected.is_set())
        return {
            "status": "ready" if ok else "not_ready",
            "redis": self.workers.redis_ok,
            "subscribed": self.dispatcher.connected.is_set(),
            "workers": len(self.workers.serving),
            "draining": leaving,
            "tasks_down": down,
        }

    async def stop(self) -> None:
        self.draining = True
        if self.background:
            await asyncio.wait(self.background, timeout=10)
        await self.supervisor.stop()
        with contextlib.suppress(*TRANSIENT_REDIS_ERRORS):
            await self.gateways.remove(self.gateway_id)
        await self.ops_recorder.flush_last()
        await self.dispatcher.stop()
        await self.redis.aclose()

    async def _check_queue_partitions(self) -> None:
        """Agree on --queue-partitions with the other processes once Redis answers. A mismatch
        raises PartitionMismatch: the supervisor logs it and keeps `/readyz` at 503."""
        while True:
            try:
                await self.queue.check_partitions()
                return
            except TRANSIENT_REDIS_ERRORS:
                reraise_if_cancelling()
                await asyncio.sleep(GATEWAY_HEARTBEAT_S)

    async def _heartbeat_loop(self) -> None:
        """Publish this gateway's entry (and so its capacity) in the gateway registry."""
        while True:
            try:
                await self.gateways.heartbeat(self.info(), GATEWAY_TTL_S)
            except TRANSIENT_REDIS_ERRORS as exc:
                reraise_if_cancelling()
                log.debug("gateway heartbeat failed", extra={"error": str(exc)})
            await asyncio.sleep(GATEWAY_HEARTBEAT_S)
