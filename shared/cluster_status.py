"""Cluster-wide numbers for ops, read from Redis: the same for /admin/status, /metrics and
`chatstream status`.

- `queue_depth`: requests waiting = `waiting_for_permit` (in the semaphore's line) +
  `undelivered_jobs` (admitted and enqueued, not yet read by a worker).
- `running`: generation permits held (leases of dead gateways are purged first).
- `capacity`: the gateways' `--max-concurrent`, or when that is 0 the sum of the live,
  not draining workers' `--max-batch` (what the gateways' admission uses).
- `workers`: the live workers, sorted by id; one that missed its heartbeats for
  `--worker-ttl` is gone from the list.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from chatstream_cluster.shared.jobqueue import JobQueue
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.registry import WorkerRegistry
from chatstream_cluster.shared.semaphore import RedisSemaphore


async def cluster_status(
    redis: aioredis.Redis, keys: Keys, max_concurrent: int = 0
) -> dict[str, Any]:
    """The status object (see the module docstring); raises the client's Redis errors."""
    held, waiting = await RedisSemaphore(redis, keys).counts()
    partitions = int(await redis.get(keys.queue_partitions) or 1)  # as the processes agreed
    undelivered = await JobQueue(redis, keys, partitions=partitions).undelivered()
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
