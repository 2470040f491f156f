"""Full-path benchmark: client → gateway → Redis → worker (demo model) → back, 1 and 16 streams."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from bench.client import run_streams
from chatstream_cluster.shared.redis_server import RedisServer
from tests.cluster import Cluster

BODY = {
    "messages": [{"role": "user", "content": "Tell me a long story about a cat and a dog."}],
    "stream": True,
    "stream_options": {"include_usage": True},
    "temperature": 0.8,
}


def run_e2e_bench(
    model: str = "demo",
    new_tokens: int = 128,
    concurrency: tuple[int, ...] = (1, 16),
    rounds: int = 3,
    worker_settings: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Best of `rounds` per concurrency, through real processes on a private Redis.

    `worker_settings`: WorkerSettings fields for the worker, e.g. `{"stream_interval": 0,
    "torch_threads": 2}` to compare with the defaults.
    """
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis", appendonly=False).start()
        cluster = Cluster(redis.url, "bench", Path(tmp))
        try:
            cluster.start_worker(model, max_batch=max(concurrency), **(worker_settings or {}))
            gateway = cluster.start_gateway(max_queue=1024, log_level="warning")
            cluster.wait_ready(gateway, timeout=300)
            body = {**BODY, "model": model, "max_tokens": new_tokens}
            asyncio.run(run_streams(gateway.url, 2, body))  # warm-up
            rows = []
            for c in concurrency:
                runs = [asyncio.run(run_streams(gateway.url, c, body)) for _ in range(rounds)]
                best = max(runs, key=lambda r: r["tokens_per_s"])
                rows.append({"scenario": "e2e", "model": model, **best})
            return rows
        finally:
            cluster.stop()
            redis.stop()
