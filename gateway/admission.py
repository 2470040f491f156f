"""Admission: one permit of the cluster-wide Redis semaphore per job (permit id = job id).

The cap is `--max-concurrent`, or when that is 0 (the default) the sum of the live, not
draining workers' `--max-batch`, read again on every try so that requests already waiting
follow workers that join or leave. The waiting line (FIFO, shared by every gateway) holds at
most `--max-queue` requests: a full line answers 429 with Retry-After at once; a request that
waits past `--queue-timeout` gets 503 `queue_timeout`; a client that disconnects while waiting
leaves the line at once (the request's task is cancelled and the semaphore's cancel path
releases). This process refreshes the leases of the permits it holds every
`--permit-lease` / 3 seconds; if it dies, they expire within the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.exceptions import RedisError

from gateway.errors import APIError
from gateway.metrics import REJECTED
from gateway.workers import WorkerCache
from shared.redis_client import REDIS_ERRORS, reraise_if_cancelling
from shared.semaphore import RedisSemaphore, SemaphoreTimeout
from shared.settings import GatewaySettings

log = logging.getLogger("chatstream.gateway")


class Admission:
    """Acquire, hold and release generation permits for this gateway's jobs."""

    def __init__(
        self, semaphore: RedisSemaphore, settings: GatewaySettings, workers: WorkerCache
    ) -> None:
        self.semaphore = semaphore
        self.settings = settings
        self.workers = workers
        self.held: set[str] = set()
        self._task: asyncio.Task | None = None

    def capacity(self) -> int:
        """The cluster-wide cap in force now."""
        return self.settings.max_concurrent or self.workers.capacity

    async def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_loop(), name="permit-refresh")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def acquire(self, permit_id: str) -> None:
        """Wait for a permit; raises APIError 429 (line full) or 503 (waited too long).

        Cancellation (client gone) leaves the line at once.
        """
        self.held.add(permit_id)  # refreshed from now on, released in every path
        try:
            result = await self.semaphore.acquire(
                permit_id,
                self.capacity,  # read on every try: the cap may follow the workers
                self.settings.max_queue,
                self.settings.queue_timeout,
            )
        except SemaphoreTimeout:
            self.held.discard(permit_id)
            REJECTED.labels(reason="queue_timeout").inc()
            log.info("queue timeout", extra={"job_id": permit_id})
            raise APIError(
                503,
                f"waited {self.settings.queue_timeout:g}s in the queue without a free slot; "
                "retry later",
                code="queue_timeout",
                headers={"Retry-After": "5"},
            ) from None
        except BaseException:
            self.held.discard(permit_id)
            raise
        if result.rejected:
            self.held.discard(permit_id)
            REJECTED.labels(reason="queue_full").inc()
            log.info("queue full: rejected", extra={"job_id": permit_id})
            raise APIError(
                429,
                f"the cluster is at capacity and its queue is full ({self.settings.max_queue} "
                "waiting); retry later",
                code="too_many_requests",
                headers={"Retry-After": "1"},
            )

    async def release(self, permit_id: str) -> None:
        """Give the permit back (idempotent)."""
        self.held.discard(permit_id)
        try:
            await self.semaphore.release(permit_id)
        except (*REDIS_ERRORS, RedisError) as exc:
            log.warning("permit release failed; its lease will expire", extra={
                "job_id": permit_id, "error": str(exc)})

    async def _refresh_loop(self) -> None:
        interval = self.settings.permit_lease / 3
        while True:
            await asyncio.sleep(interval)
            if not self.held:
                continue
            try:
                await self.semaphore.refresh(list(self.held))
            except (*REDIS_ERRORS, RedisError) as exc:
                reraise_if_cancelling()
                log.warning("permit refresh failed", extra={"error": str(exc)})
