"""Admission: one permit of the job's model's cluster-wide Redis semaphore per job (permit id =
job id). Every served model has its own semaphore (`Keys.model_semaphore`), so its own cap and
its own waiting line: one model's overload never holds up another's requests.

The cap is `--max-concurrent`, or when that is 0 (the default) the sum of the model's live,
not draining workers' `--max-batch`, read again on every try so that requests already waiting
follow workers that join or leave. The waiting line (FIFO, shared by every gateway) holds at
most `--max-queue` requests: a full line answers 429 with Retry-After at once; a request that
waits past `--queue-timeout` gets 503 `queue_timeout`. Scale from zero: a request for a model
with no live worker (cap 0) waits in that line for up to `--cold-start-timeout` while a worker
starts, and gets 503 `cold_start_timeout` if none does. A client that disconnects while waiting
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
model's permit and exceeding it answers 429 at once (`per_key_limit`); it is refreshed and
released like the model's permit. `Admission.extra_permits()` builds the list for a request.
(A ChatStream session needs no cap of its own: its turn lock already allows one turn at a time.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
        self, redis: Any, settings: GatewaySettings, workers: WorkerCache, keys: Keys,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.workers = workers
        self.held: dict[str, int] = {}  # permit id -> connections of this process holding it
        self.model_of: dict[str, str] = {}  # permit id -> its job's model
        self._semaphores: dict[str, RedisSemaphore] = {}
        self._lapse_handlers: dict[str, list[Callable[[], None]]] = {}
        self.extra_held: dict[tuple[str, str], RedisSemaphore] = {}  # (name, permit id)
        # A model's waiters ask again as soon as its workers change (a cold start ends).
        if workers is not None:
            workers.on_capacity_change.append(lambda model: self.semaphore(model).wake())

    def semaphore(self, model: str) -> RedisSemaphore:
        """The semaphore of served model `model`."""
        sem = self._semaphores.get(model)
        if sem is None:
            sem = RedisSemaphore(self.redis, self.keys, self.keys.model_semaphore(model),
                                 lease_s=self.settings.permit_lease)
            self._semaphores[model] = sem
        return sem

    def extra_permits(self, api_key_id: str | None) -> list[ExtraPermit]:
        """The caps a request must fit under besides its model's: its API key's, if capped.

        `api_key_id` is `gateway.auth.api_key_id(request)` (a digest, safe in a key name)."""
        s = self.settings
        if not (api_key_id and s.max_concurrent_per_key):
            return []
        sem = RedisSemaphore(self.redis, self.keys, f"key-{api_key_id}", lease_s=s.permit_lease)
        return [ExtraPermit(sem, s.max_concurrent_per_key, "per_key_limit", "this API key")]

    def capacity(self, model: str) -> int:
        """The cap on `model`'s running generations in force now."""
        return self.settings.max_concurrent or self.workers.capacity_for(model)

    def on_lapse(self, permit_id: str, handler: Callable[[], None]) -> None:
        """Call `handler` if the permit lapses and cannot be taken again."""
        self._lapse_handlers.setdefault(permit_id, []).append(handler)

    def forget_lapse(self, permit_id: str, handler: Callable[[], None]) -> None:
        handlers = self._lapse_handlers.get(permit_id, [])
        if handler in handlers:
            handlers.remove(handler)
        if not handlers:
            self._lapse_handlers.pop(permit_id, None)

    async def acquire(self, permit_id: str, model: str, *, cold_start: bool = False) -> None:
        """Wait for a permit of `model`; raises APIError 429 (line full) or 503 (waited too
        long). `cold_start`: no worker of the model runs yet, so wait up to
        `--cold-start-timeout` (instead of `--queue-timeout`) for one to start and take it.

        Cancellation (client gone) leaves the line at once.
        """
        s = self.settings
        timeout = s.cold_start_timeout if cold_start else s.queue_timeout
        self.held[permit_id] = self.held.get(permit_id, 0) + 1  # refreshed from now on
        self.model_of[permit_id] = model
        try:
            result = await self.semaphore(model).acquire(
                permit_id,
                lambda: self.capacity(model),  # read on every try: it follows the workers
                s.max_queue,
                timeout,
            )
        except SemaphoreTimeout:
            self.disown(permit_id)
            REJECTED.labels(reason="queue_timeout", model=model).inc()
            log.info("queue timeout", extra={"job_id": permit_id, "model": model})
            if not self.workers.serving_for(model):
                raise APIError(
                    503, f"no worker of model {model!r} started within {timeout:g}s; retry "
                    "later", code="cold_start_timeout", headers={"Retry-After": "5"},
                ) from None
            raise APIError(
                503,
                f"waited {timeout:g}s in the queue without a free slot; retry later",
                code="queue_timeout",
                headers={"Retry-After": "5"},
            ) from None
        except BaseException:
            self.disown(permit_id)
            raise
        if result.rejected:
            self.disown(permit_id)
            REJECTED.labels(reason="queue_full", model=model).inc()
            log.info("queue full: rejected", extra={"job_id": permit_id, "model": model})
            raise APIError(
                429,
                f"model {model!r} is at capacity and its queue is full ({s.max_queue} "
                "waiting); retry later",
                code="too_many_requests",
                headers={"Retry-After": "1"},
            )

    async def acquire_extra(self, permit: ExtraPermit, permit_id: str, model: str) -> None:
        """Take a permit of `permit`'s semaphore at once or raise APIError 429 (no waiting)."""
        sem = permit.semaphore
        self.extra_held[(sem.name, permit_id)] = sem  # refreshed from now, released in cleanup
        result = await sem.try_acquire(permit_id, permit.capacity, 0)
        if not result.acquired:
            self.extra_held.pop((sem.name, permit_id), None)
            REJECTED.labels(reason=permit.code, model=model).inc()
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
            self.model_of.pop(permit_id, None)

    async def release(self, permit_id: str, model: str) -> None:
        """Give the permit back: its job ended here (idempotent)."""
        self.held.pop(permit_id, None)
        self.model_of.pop(permit_id, None)
        try:
            await self.semaphore(model).release(permit_id)
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
        by_model: dict[str, list[str]] = {}
        for permit_id in list(self.held):
            model = self.model_of.get(permit_id)
            if model is not None:
                by_model.setdefault(model, []).append(permit_id)
        batches: list[tuple[RedisSemaphore, list[str], str | None]] = [
            (self.semaphore(model), ids, model) for model, ids in by_model.items()
        ]
        extra: dict[str, tuple[RedisSemaphore, list[str], str | None]] = {}
        for (name, permit_id), sem in list(self.extra_held.items()):
            extra.setdefault(name, (sem, [], None))[1].append(permit_id)
        batches.extend(extra.values())
        for sem, ids, model in batches:
            try:
                lapsed = await sem.refresh(ids)
            except TRANSIENT_REDIS_ERRORS as exc:
                reraise_if_cancelling()
                log.warning("permit refresh failed", extra={"error": str(exc)})
                continue
            for permit_id in lapsed:
                await self._lapsed(sem, permit_id, model)

    async def _lapsed(self, sem: RedisSemaphore, permit_id: str, model: str | None) -> None:
        """A permit this process holds was found gone: take it again within the cap, or end
        the streams that need it. `model`: a model's permit; None: an extra permit."""
        if model is not None and permit_id not in self.held:
            return  # released meanwhile
        capacity = self.capacity(model) if model is not None else self._extra_capacity(sem)
        result = await sem.try_acquire(permit_id, capacity, 0)
        if result.acquired:
            PERMITS_LAPSED.labels(outcome="retaken").inc()
            log.warning("permit lapsed and was taken again", extra={"job_id": permit_id})
            return
        PERMITS_LAPSED.labels(outcome="ended").inc()
        log.warning("permit lapsed and the cap is full: ending its stream",
                    extra={"job_id": permit_id, "semaphore": sem.name})
        if model is not None:
            self.held.pop(permit_id, None)
            self.model_of.pop(permit_id, None)
            for handler in self._lapse_handlers.pop(permit_id, []):
                handler()
        else:
            self.extra_held.pop((sem.name, permit_id), None)

    def _extra_capacity(self, sem: RedisSemaphore) -> int:
        return self.settings.max_concurrent_per_key if sem.name.startswith("key-") else 0
