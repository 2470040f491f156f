"""Cluster-wide numbers for ops, read from Redis: the same for /admin/status, /metrics,
ChatStream's /get_load and `chatstream status`.

- `queue_depth`: requests waiting = `waiting_for_permit` (in the semaphore's line) +
  `undelivered_jobs` (admitted and enqueued, not yet read by a worker).
- `running`: generation permits held (leases of dead gateways are purged first).
- `capacity`: the cap the gateways enforce, per model: their `--max-concurrent` as they
  publish it in the gateway registry (the largest, if they differ), or when none sets one, the
  sum of the model's live, not draining workers' `--max-batch` (what the gateways' admission
  derives).
- `gateways`: the live gateways and the admission settings each enforces.
- `workers`: the live workers, sorted by id; one that missed its heartbeats for
  `--worker-ttl` is gone from the list. Each has a `state`: `draining`, `stale` (no heartbeat
  for `STALE_AFTER_S`: three of the default one-second heartbeats missed) or `serving`, and
  reports `waiting` (requests inside it that wait for a batch slot or KV cache) and
  `kv_tokens_used`/`kv_tokens_total` (its KV cache).
- `waiting_in_workers`: the workers' `waiting`, summed.
- `last_minute`: cluster-wide tokens/s, TTFT p50/p99 and rejections by reason over the last
  minute, summed from what every gateway counted (shared/ops_stats.py).
- `models`: one entry per served model the cluster knows (shared/models.py: served lately,
  declared by a gateway's `--models`, or live now), with that model's own `queue_depth`
  (`waiting_for_permit` + `undelivered_jobs`), `running`, `capacity`, `workers` (live),
  `serving` (live, not draining), `waiting_in_workers` and `tokens_per_s`. The cluster-wide
  `queue_depth`, `running`, `capacity` and their parts above are the sums over the models.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from chatstream_cluster.shared.jobqueue import JobQueue
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.models import ModelRegistry
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


async def model_counts(
    redis: aioredis.Redis, keys: Keys, model: str, partitions: int
) -> tuple[int, int, int]:
    """(running, waiting for a permit, undelivered jobs) of served model `model`."""
    held, waiting = await RedisSemaphore(redis, keys, keys.model_semaphore(model)).counts()
    undelivered = await JobQueue(redis, keys, model=model, partitions=partitions).undelivered()
    return held, waiting, undelivered


async def cluster_status(redis: aioredis.Redis, keys: Keys) -> dict[str, Any]:
    """The status object (see the module docstring); raises the client's Redis errors."""
    partitions = int(await redis.get(keys.queue_partitions) or 1)  # as the processes agreed
    live = await WorkerRegistry(redis, keys).live()
    gateways = await GatewayRegistry(redis, keys).live()
    seen = await ModelRegistry(redis, keys).known()
    declared = {m for g, _ in gateways for m in g.models}
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
    caps = [g.max_concurrent for g, _ in gateways]
    models = []
    for name in sorted({*seen, *declared, *(w["model"] for w in workers)}):
        held, waiting, undelivered = await model_counts(redis, keys, name, partitions)
        mine = [w for w in workers if w["model"] == name]
        serving = [w for w in mine if not w["draining"]]
        models.append({
            "name": name,
            "queue_depth": waiting + undelivered,
            "waiting_for_permit": waiting,
            "undelivered_jobs": undelivered,
            "running": held,
            "capacity": capacity_of(caps, [w["max_batch"] for w in serving]),
            "workers": len(mine),
            "serving": len(serving),
            "waiting_in_workers": sum(w["waiting"] for w in mine),
            "tokens_per_s": round(sum(w["tokens_per_s"] for w in mine), 1),
            "declared": name in declared,
        })

    def total(field: str) -> int:
        return sum(m[field] for m in models)

    return {
        "queue_depth": total("queue_depth"),
        "waiting_for_permit": total("waiting_for_permit"),
        "undelivered_jobs": total("undelivered_jobs"),
        "running": total("running"),
        "capacity": total("capacity"),
        "gateways": [
            {"id": g.id, "host": g.host, "pid": g.pid, "max_concurrent": g.max_concurrent,
             "max_queue": g.max_queue, "models": g.models, "draining": g.draining,
             "last_heartbeat_s": round(age, 3)}
            for g, age in gateways
        ],
        "waiting_in_workers": sum(w["waiting"] for w in workers),
        "models": models,
        "workers": workers,
        "last_minute": await OpsStats(redis, keys).last_minute(),
    }
