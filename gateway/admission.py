"""Admission: one permit of the cluster-wide Redis semaphore per job (permit id = job id).

The cap is `--max-concurrent`, or when that is 0 (the default) the sum of the live, not
draining workers' `--max-batch`, read again on every try so that requests already waiting
follow workers that join or leave. The waiting line (FIFO, shared by every gateway) holds at
most `--max-queue` requests: a full line answers 429 with Retry-After at once; a request that
waits past `--queue-timeout` gets 503 `queue_timeout`; a client that disconnects while waiting
leaves the line at once (the request's task is cancelled and the semaphore's cancel path
releases). This process refreshes the leases of the permits it holds every
`--permit-lease` / 3 seconds; if it dies, they expire within the lease. A permit the refresh
finds gone (its lease ran out: Redis or this process stalled for longer than the lease) has
lapsed: it is taken again if the cap allows, else its stream ends with `permit_lapsed`, so
the cluster never runs more than its cap (`chatstream_permits_lapsed_total{outcome}`).

Several connections of this gateway may relay one job (a resume takes over from a connection
that has not noticed yet): the permit is refreshed while any of them holds it; the one that
ends the job releases it; the others only `disown` it.

Extra permits: the optional cap per API key (`--max-concurrent-per-key`) is a semaphore of its
own per key (`key-<sha256(key)[:16]>`) with no waiting line. A generation takes it before the
global permit and exceeding it answers 429 at once (`per_key_limit`); it is refreshed and
released like the global permit. `Admission.extra_permits()` builds the list for a request.
(A ChatStream session needs no cap of its own: its turn lock already allows one turn at a time.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from chatstream_cluster.gateway.errors import APIError
from chatstream_cluster.gateway.metrics import PERMITS_LAPSED, REJECTED
from chatstream_cluster.gateway.workers import WorkerCache
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS, reraise_if_cancelling
from chatstream_cluster.shared.semaphore import RedisSemaphore, SemaphoreTimeout
from chatstream_cluster.shared.settings import GatewaySettings

log = logging.getLogger("chatstream.gateway")


@dataclass(frozen=True)
class ExtraPermit:
    """A cap a generation must fit under besides the cluster's: a semaphore without a line."""

    semaphore: RedisSemaphore
    capacity: int
    code: str  # the 429's error code and the rejected-metric reason
    what: str  # for the message: "this API key", "this session"


class Admission:
    """Acquire, hold and release generation permits for this gateway's jobs."""

    def __init__(
        self, semaphore: RedisSemaphore, settings: GatewaySettings, workers: WorkerCache,
        keys: Keys,
    ) -> None:
        self.semaphore = semaphore
        self.keys = keys
        self.settings = settings
        self.workers = workers
        self.held: dict[str, int] = {}  # permit id -> connections of this process holding it
        self._lapse_handlers: dict[str, list[Callable[[], None]]] = {}
        self.extra_held: dict[tuple[str, str], RedisSemaphore] = {}  # (name, permit id)

    def extra_permits(self, api_key_id: str | None) -> list[ExtraPermit]:
        """The caps a request must fit under besides the cluster's: its API key's, if capped.

        `api_key_id` is `gateway.auth.api_key_id(request)` (a digest, safe in a key name)."""
        s = self.settings
        if not (api_key_id and s.max_concurrent_per_key):
            return []
        sem = RedisSemaphore(self.semaphore.redis, self.keys, f"key-{api_key_id}",
                             lease_s=s.permit_lease)
        return [ExtraPermit(sem, s.max_concurrent_per_key, "per_key_limit", "this API key")]

    def capacity(self) -> int:
        """The cluster-wide cap in force now."""
        return self.settings.max_concurrent or self.workers.capacity

    def on_lapse(self, permit_id: str, handler: Callable[[], None]) -> None:
        """Call `handler` if the permit lapses and cannot be taken again."""
        self._lapse_handlers.setdefault(permit_id, []).append(handler)

    def forget_lapse(self, permit_id: str, handler: Callable[[], None]) -> None:
        handlers = self._lapse_handlers.get(permit_id, [])
        if handler in handlers:
            handlers.remove(handler)
        if not handlers:
            self._lapse_handlers.pop(permit_id, None)

    async def acquire(self, permit_id: str) -> None:
        """Wait for a permit; raises APIError 429 (line full) or 503 (waited too long).

        Cancellation (client gone) leaves the line at once.
        """
        self.held[permit_id] = self.held.get(permit_id, 0) + 1  # refreshed from now on
        try:
            result = await self.semaphore.acquire(
                permit_id,
                self.capacity,  # read on every try: the cap may follow the workers
                self.settings.max_queue,
                self.settings.queue_timeout,
            )
        except SemaphoreTimeout:
            self.disown(permit_id)
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
            self.disown(permit_id)
            raise
        if result.rejected:
            self.disown(permit_id)
            REJECTED.labels(reason="queue_full").inc()
            log.info("queue full: rejected", extra={"job_id": permit_id})
            raise APIError(
                429,
                f"the cluster is at capacity and its queue is full ({self.settings.max_queue} "
                "waiting); retry later",
                code="too_many_requests",
                headers={"Retry-After": "1"},
            )

    async def acquire_extra(self, permit: ExtraPermit, permit_id: str) -> None:
        """Take a permit of `permit`'s semaphore at once or raise APIError 429 (no waiting)."""
        sem = permit.semaphore
        self.extra_held[(sem.name, permit_id)] = sem  # refreshed from now, released in cleanup
        result = await sem.try_acquire(permit_id, permit.capacity, 0)
        if not result.acquired:
            self.extra_held.pop((sem.name, permit_id), None)
            REJECTED.labels(reason=permit.code).inc()
            log.info("concurrency cap: rejected", extra={"job_id": permit_id, "code": permit.code})
            raise APIError(
                429,
                f"{permit.what} already has {permit.capacity} generation(s) running, its "
                "limit; retry when one finishes",
                code=permit.code,
                headers={"Retry-After": "1"},
            )

    async def release_extra(self, permit: ExtraPermit, permit_id: str) -> None:
        """Give an extra permit back (idempotent; nothing to do if it was never taken)."""
        sem = self.extra_held.pop((permit.semaphore.name, permit_id), None)
        if sem is None:
            return
        try:
            await sem.release(permit_id)
        except TRANSIENT_REDIS_ERRORS as exc:
            log.warning("permit release failed; its lease will expire", extra={
                "job_id": permit_id, "semaphore": sem.name, "error": str(exc)})

    def disown(self, permit_id: str) -> None:
        """One connection of this process stops holding the permit; it is not released (the
        connection that relays the job now will). The last one stops refreshing it."""
        count = self.held.get(permit_id, 0) - 1
        if count > 0:
            self.held[permit_id] = count
        else:
            self.held.pop(permit_id, None)

    async def release(self, permit_id: str) -> None:
        """Give the permit back: its job ended here (idempotent)."""
        self.held.pop(permit_id, None)
        try:
            await self.semaphore.release(permit_id)
        except TRANSIENT_REDIS_ERRORS as exc:
            log.warning("permit release failed; its lease will expire", extra={
                "job_id": permit_id, "error": str(exc)})

    async def refresh_loop(self) -> None:
        """Keep this process's permits alive (supervised by the gateway state)."""
        interval = self.settings.permit_lease / 3
        while True:
            await asyncio.sleep(interval)
            await self.refresh_once()

    async def refresh_once(self) -> None:
        """Extend every held permit's lease; handle the ones that lapsed."""
        batches: list[tuple[RedisSemaphore, list[str]]] = []
        if self.held:
            batches.append((self.semaphore, list(self.held)))
        extra: dict[str, tuple[RedisSemaphore, list[str]]] = {}
        for (name, permit_id), sem in list(self.extra_held.items()):
            extra.setdefault(name, (sem, []))[1].append(permit_id)
        batches.extend(extra.values())
        for sem, ids in batches:
            try:
                lapsed = await sem.refresh(ids)
            except TRANSIENT_REDIS_ERRORS as exc:
                reraise_if_cancelling()
                log.warning("permit refresh failed", extra={"error": str(exc)})
                continue
            for permit_id in lapsed:
                await self._lapsed(sem, permit_id)

    async def _lapsed(self, sem: RedisSemaphore, permit_id: str) -> None:
        """A permit this process holds was found gone: take it again within the cap, or end
        the streams that need it."""
        is_global = sem is self.semaphore
        if is_global and permit_id not in self.held:
            return  # released meanwhile
        capacity = self.capacity() if is_global else self._extra_capacity(sem)
        result = await sem.try_acquire(permit_id, capacity, 0)
        if result.acquired:
            PERMITS_LAPSED.labels(outcome="retaken").inc()
            log.warning("permit lapsed and was taken again", extra={"job_id": permit_id})
            return
        PERMITS_LAPSED.labels(outcome="ended").inc()
        log.warning("permit lapsed and the cap is full: ending its stream",
                    extra={"job_id": permit_id, "semaphore": sem.name})
        if is_global:
            self.held.pop(permit_id, None)
            for handler in self._lapse_handlers.pop(permit_id, []):
                handler()
        else:
            self.extra_held.pop((sem.name, permit_id), None)

    def _extra_capacity(self, sem: RedisSemaphore) -> int:
        return self.settings.max_concurrent_per_key if sem.name.startswith("key-") else 0
