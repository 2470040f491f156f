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
from chatstream_cluster.shared.cluster_status import cluster_status, model_counts
from chatstream_cluster.shared.job_state import JobStates
from chatstream_cluster.shared.jobqueue import JobQueue
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.models import ModelRegistry
from chatstream_cluster.shared.ops_stats import OpsStats
from chatstream_cluster.shared.redis_client import make_redis
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS, reraise_if_cancelling
from chatstream_cluster.shared.redis_topology import is_cluster
from chatstream_cluster.shared.registry import GatewayRegistry, WorkerRegistry
from chatstream_cluster.shared.schemas import GatewayInfo
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
        self._queues: dict[str, JobQueue] = {}
        self.states = JobStates(self.redis, self.keys)
        self.registry = WorkerRegistry(self.redis, self.keys)
        self.gateways = GatewayRegistry(self.redis, self.keys)
        self.workers = WorkerCache(self.registry, ModelRegistry(self.redis, self.keys),
                                   declared=settings.models)
        self.admission = Admission(self.redis, settings, self.workers, self.keys)
        self.dispatcher: Dispatcher | ShardedDispatcher
        if is_cluster(self.redis):  # one sharded channel per job (docs/operations.md)
            self.dispatcher = ShardedDispatcher(self.redis, self.keys, self.gateway_id)
        else:
            self.dispatcher = Dispatcher(settings.redis_url, self.keys, self.gateway_id)
        # Sentinel: follow a failover at once (shared/sentinel_watch.py).
        self.sentinel_watch = sentinel_watch(settings.redis_url, [self._reconnect_dispatcher])
        self.ops_stats = OpsStats(self.redis, self.keys)
        self.ops_recorder = OpsRecorder(self.ops_stats, self._queue_depth)
        self.background: set[asyncio.Task] = set()  # per-request cleanups
        self.supervisor = Supervisor(lambda name, _exc: TASK_FAILURES.labels(task=name).inc())
        self.draining = False  # refusing new generations (shutting down)
        self.leaving = False  # SIGTERM seen: /readyz 503, still serving (--shutdown-grace)

    def queue(self, model: str) -> JobQueue:
        """Served model `model`'s job queue."""
        queue = self._queues.get(model)
        if queue is None:
            queue = JobQueue(self.redis, self.keys, model=model,
                             partitions=self.settings.queue_partitions)
            self._queues[model] = queue
        return queue

    def served_models(self) -> list[str]:
        """Models with a live, serving worker (what `/v1/models` lists)."""
        return self.workers.models

    def cold_start(self, model: str) -> bool:
        """A request for `model` waits for a worker to start (`--cold-start-timeout`): the
        model is known and none of its workers serves now. False when one serves it, for a
        model the cluster does not know, or when cold starts are off."""
        w = self.workers
        return (self.settings.cold_start_timeout > 0 and model in w.known_models
                and not w.serving_for(model))

    def default_model(self) -> str | None:
        """The model of requests that name none (the ChatStream endpoints): `--default-model`,
        else the one model the cluster knows; None when it knows none or several."""
        if self.settings.default_model:
            return self.settings.default_model
        known = self.workers.known_models
        return next(iter(known)) if len(known) == 1 else None

    async def _queue_depth(self) -> int:
        """The cluster's queue depth: every known model's, summed (for the ops history)."""
        total = 0
        for model in sorted(self.workers.known_models):
            _held, waiting, undelivered = await model_counts(
                self.redis, self.keys, model, self.settings.queue_partitions)
            total += waiting + undelivered
        return total

    def info(self) -> GatewayInfo:
        """This gateway's registry entry."""
        s = self.settings
        return GatewayInfo(
            id=self.gateway_id, pid=os.getpid(), host=socket.gethostname(),
            max_concurrent=s.max_concurrent, max_queue=s.max_queue, models=s.models,
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
        """Readiness: Redis answers, a worker is live (not needed with --cold-start-timeout:
        the gateway then holds requests while workers start), no background task is down, not
        draining, and no SIGTERM seen (not ready during --shutdown-grace, still serving)."""
        down = dict(self.supervisor.down)
        leaving = self.leaving or self.draining
        has_workers = bool(self.workers.serving) or self.settings.cold_start_timeout > 0
        ok = (self.workers.fresh() and has_workers and not leaving
              and not down and self.dispatcher.connected.is_set())
        return {
            "status": "ready" if ok else "not_ready",
            "redis": self.workers.redis_ok,
            "subscribed": self.dispatcher.connected.is_set(),
            "workers": len(self.workers.serving),
            "models": self.workers.models,
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
                await self.queue("").check_partitions()  # the count is cluster-wide
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
