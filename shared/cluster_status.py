"""Cluster-wide numbers for ops, read from Redis: the same for /admin/status, /metrics,
ChatStream's /get_load and `chatstream status`.

- `queue_depth`: requests waiting = `waiting_for_permit` (in the semaphore's line) +
  `undelivered_jobs` (admitted and enqueued, not yet read by a worker).
- `running`: generation permits held (leases of dead gateways are purged first).
- `capacity`: the cap the gateways enforce: their `--max-concurrent` as they publish it in the
  gateway registry (the largest, if they differ), or when none sets one, the sum of the live,
  not draining workers' `--max-batch` (what the gateways' admission derives).
- `gateways`: the live gateways and the admission settings each enforces.
- `workers`: the live workers, sorted by id; one that missed its heartbeats for
  `--worker-ttl` is gone from the list. Each has a `state`: `draining`, `stale` (no heartbeat
  for `STALE_AFTER_S`: three of the default one-second heartbeats missed) or `serving`, and
  reports `waiting` (requests inside it that wait for a batch slot or KV cache) and
  `kv_tokens_used`/`kv_tokens_total` (its KV cache).
- `waiting_in_workers`: the workers' `waiting`, summed.
- `last_minute`: cluster-wide tokens/s, TTFT p50/p99 and rejections by reason over the last
  minute, summed from what every gateway counted (shared/ops_stats.py).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from chatstream_cluster.shared.jobqueue import JobQueue
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.ops_stats import OpsStats
from chatstream_cluster.shared.registry import GatewayRegistry, WorkerRegistry
from chatstream_cluster.shared.semaphore import RedisSemaphore

STALE_AFTER_S = 3.0


def worker_state(draining: bool, heartbeat_age_s: float) -> str:
    """`draining`, `stale` (heartbeats late, not yet past its TTL) or `serving`."""
    if draining:
        return "draining"
    return "stale" if heartbeat_age_s > STALE_AFTER_S else "serving"


def capacity_of(max_concurrents: list[int], worker_batches: list[int]) -> int:
    """The cap in force: the gateways' `--max-concurrent` (the largest set), else derived."""
    return max((m for m in max_concurrents if m > 0), default=0) or sum(worker_batches)


async def cluster_status(redis: aioredis.Redis, keys: Keys) -> dict[str, Any]:
    """The status object (see the module docstring); raises the client's Redis errors."""
    held, waiting = await RedisSemaphore(redis, keys).counts()
    undelivered = await JobQueue(redis, keys).undelivered()
    live = await WorkerRegistry(redis, keys).live()
    gateways = await GatewayRegistry(redis, keys).live()
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
            "waiting": w.waiting,
            "kv_tokens_used": w.kv_tokens_used,
            "kv_tokens_total": w.kv_tokens_total,
            "last_heartbeat_s": round(age, 3),
            "state": worker_state(w.draining, age),
        }
        for w, age in live
    ]
    capacity = capacity_of(
        [g.max_concurrent for g, _ in gateways], [w.max_batch for w, _ in live if not w.draining]
    )
    return {
        "queue_depth": waiting + undelivered,
        "waiting_for_permit": waiting,
        "undelivered_jobs": undelivered,
        "running": held,
        "capacity": capacity,
        "gateways": [
            {"id": g.id, "host": g.host, "pid": g.pid, "max_concurrent": g.max_concurrent,
             "max_queue": g.max_queue, "draining": g.draining,
             "last_heartbeat_s": round(age, 3)}
            for g, age in gateways
        ],
        "waiting_in_workers": sum(w["waiting"] for w in workers),
        "workers": workers,
        "last_minute": await OpsStats(redis, keys).last_minute(),
    }
