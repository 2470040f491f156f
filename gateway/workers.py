"""The gateway's view of the live workers and of Redis health, refreshed in the background.

Requests read this cache instead of asking Redis each time; a request that finds no live
worker waits for the next refresh that sees one, up to `no_worker_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from chatstream_cluster.gateway.errors import APIError, redis_unavailable
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS, reraise_if_cancelling
from chatstream_cluster.shared.registry import WorkerRegistry
from chatstream_cluster.shared.schemas import WorkerInfo
from chatstream_cluster.shared.waits import wait_set

log = logging.getLogger("chatstream.gateway")


class WorkerCache:
    """Live workers as of the last refresh, and whether Redis answered it."""

    def __init__(self, registry: WorkerRegistry, interval: float = 0.5) -> None:
        self.registry = registry
        self.interval = interval
        self.workers: list[tuple[WorkerInfo, float]] = []
        self.redis_ok = False
        self.last_ok = 0.0
        self._changed = asyncio.Event()

    async def refresh(self) -> None:
        try:
            self.workers = await self.registry.live()
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
        """Live workers that take jobs (not draining)."""
        return [w for w, _age in self.workers if not w.draining]

    @property
    def capacity(self) -> int:
        return sum(w.max_batch for w in self.serving)

    @property
    def models(self) -> list[str]:
        return sorted({w.model for w in self.serving})

    async def wait_for_worker(self, timeout: float) -> None:
        """Return once a serving worker is known; else 503: at once when Redis is down, after
        `timeout` when no worker is."""
        deadline = time.monotonic() + timeout
        while self.redis_ok and not self.serving:  # Redis down: waiting cannot help, 503 now
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await wait_set(self._changed, remaining)
        if not self.redis_ok:
            raise redis_unavailable()
        if not self.serving:
            raise APIError(
                503,
                "no worker is available to serve this request; start a worker or retry later",
                code="no_worker",
                headers={"Retry-After": "5"},
            )
