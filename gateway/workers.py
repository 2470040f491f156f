"""The gateway's view of the live workers, the known models and Redis health, refreshed in the
background.

Requests read this cache instead of asking Redis each time; a request that finds no live
worker of its model waits for the next refresh that sees one, up to `no_worker_timeout`.
Known models (shared/models.py): those declared with `--models`, those a worker served within
a day, and those a live worker serves now.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from chatstream_cluster.gateway.errors import APIError, redis_unavailable
from chatstream_cluster.shared.models import ModelRegistry
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS, reraise_if_cancelling
from chatstream_cluster.shared.registry import WorkerRegistry
from chatstream_cluster.shared.schemas import WorkerInfo
from chatstream_cluster.shared.waits import wait_set

log = logging.getLogger("chatstream.gateway")


class WorkerCache:
    """Live workers and known models as of the last refresh, and whether Redis answered it."""

    def __init__(
        self, registry: WorkerRegistry, models: ModelRegistry | None = None,
        declared: list[str] | None = None, interval: float = 0.5,
    ) -> None:
        self.registry = registry
        self.model_registry = models
        self.declared = set(declared or [])
        self.interval = interval
        self.workers: list[tuple[WorkerInfo, float]] = []
        self.seen: set[str] = set()  # models a worker served lately
        self.redis_ok = False
        self.last_ok = 0.0
        self._changed = asyncio.Event()
        self.on_capacity_change: list[Callable[[str], None]] = []  # called with the model

    async def refresh(self) -> None:
        try:
            before = {m: self.capacity_for(m) for m in self.models}
            self.workers = await self.registry.live()
            for model in {*before, *self.models}:
                if self.capacity_for(model) != before.get(model, 0):
                    for callback in self.on_capacity_change:
                        callback(model)
            if self.model_registry is not None:
                self.seen = set(await self.model_registry.known())
            self.redis_ok = True
            self.last_ok = time.monotonic()
        except TRANSIENT_REDIS_ERRORS as exc:
            reraise_if_cancelling()
            if self.redis_ok:
                log.warning("redis unreachable", extra={"error": str(exc)})
            self.redis_ok = False
        self._changed.set()
        self._changed = asyncio.Event()

    async def refresh_loop(self) -> None:
        """Refresh every `interval` seconds, forever (a supervised task)."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval)

    def fresh(self, max_age_s: float = 3.0) -> bool:
        """Redis answered a refresh within `max_age_s` seconds."""
        return self.redis_ok and time.monotonic() - self.last_ok < max_age_s

    @property
    def serving(self) -> list[WorkerInfo]:
        """Live workers that take jobs (not draining), of every model."""
        return [w for w, _age in self.workers if not w.draining]

    def serving_for(self, model: str) -> list[WorkerInfo]:
        """Live workers of `model` that take jobs."""
        return [w for w in self.serving if w.model == model]

    def live_for(self, model: str) -> list[WorkerInfo]:
        """Live workers of `model`, draining or not."""
        return [w for w, _age in self.workers if w.model == model]

    def capacity_for(self, model: str) -> int:
        """The sum of `model`'s serving workers' `--max-batch`."""
        return sum(w.max_batch for w in self.serving_for(model))

    @property
    def models(self) -> list[str]:
        """Models with a serving worker."""
        return sorted({w.model for w in self.serving})

    @property
    def known_models(self) -> set[str]:
        """Models the cluster knows: declared, served lately, or live now."""
        return self.declared | self.seen | {w.model for w, _age in self.workers}

    async def _wait_until(self, done: Callable[[], bool], timeout: float) -> None:
        """Wait over refreshes until `done()`, Redis is down (waiting cannot help), or
        `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while self.redis_ok and not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await wait_set(self._changed, remaining)

    async def wait_for_any(self, timeout: float) -> None:
        """Return once some model is known (or Redis is down), or after `timeout`."""
        await self._wait_until(lambda: bool(self.known_models), timeout)

    async def wait_for_worker(self, model: str, timeout: float) -> None:
        """Return once a serving worker of `model` is known; else 503: at once when Redis is
        down, after `timeout` when no worker of it is."""
        await self._wait_until(lambda: bool(self.serving_for(model)), timeout)
        if not self.redis_ok:
            raise redis_unavailable()
        if not self.serving_for(model):
            raise APIError(
                503,
                f"no worker of model {model!r} is available to serve this request; start a "
                "worker or retry later",
                code="no_worker",
                headers={"Retry-After": "5"},
            )
