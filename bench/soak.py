"""The long soak (`python -m bench --scenarios soak`): tests/soak.py for several minutes.

Steady streaming load through 3 gateways with random SIGKILLs of workers and gateways, SIGSTOPs
of workers and `CLIENT KILL TYPE pubsub`, clients resuming on another gateway with
Last-Event-ID. One row: streams, faults, resumes, exact, explicit errors, silently truncated
(must be 0), and whether permits, queue depth and workers returned to their true values.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from chatstream_cluster.shared.redis_server import RedisServer
from tests.cluster import Cluster
from tests.soak import Soak


def run_soak_bench(seconds: float = 300, clients: int = 16, seed: int = 7) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis", appendonly=False).start()
        cluster = Cluster(redis.url, "soak", Path(tmp))
        try:
            report = Soak(cluster, gateways=3, workers=3, clients=clients, seed=seed).run(seconds)
            return [{"scenario": "soak", **report.row()}]
        finally:
            cluster.stop()
            redis.stop()
