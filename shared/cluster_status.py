"""Cluster-wide numbers for ops, read from Redis: the same for /admin/status, /metrics and
`chatstream status`."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from shared.jobqueue import JobQueue
from shared.keys import Keys
from shared.registry import WorkerRegistry
from shared.semaphore import RedisSemaphore


async def cluster_status(
    redis: aioredis.Redis, keys: Keys, max_concurrent: int = 0
) -> dict[str, Any]:
    """queue_depth (waiting for a permit + jobs no worker read), running, capacity, workers."""
    held, waiting = await RedisSemaphore(redis, keys).counts()
    undelivered = await JobQueue(redis, keys).undelivered()
    live = await WorkerRegistry(redis, keys).live()
    workers = [
        {
            "id": w.id,
            "pid": w.pid,
            "host": w.host,
            "model": w.model,
            "device": w.device,
            "running": w.running,
            "max_batch": w.max_batch,
            "draining": w.draining,
            "tokens_per_s": w.tokens_per_s,
            "last_heartbeat_s": round(age, 3),
        }
        for w, age in live
    ]
    serving = sum(w.max_batch for w, _ in live if not w.draining)
    return {
        "queue_depth": waiting + undelivered,
        "waiting_for_permit": waiting,
        "undelivered_jobs": undelivered,
        "running": held,
        "capacity": max_concurrent or serving,
        "workers": workers,
    }
