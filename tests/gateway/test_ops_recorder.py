"""gateway/ops_recorder.py: each counter increment reaches Redis once, even after a failed flush."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from chatstream_cluster.gateway.metrics import REJECTED, TOKENS, TTFT
from chatstream_cluster.gateway.ops_recorder import OpsRecorder
from chatstream_cluster.shared.jobqueue import JobQueue
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.ops_stats import OpsStats
from chatstream_cluster.shared.redis_client import make_redis
from chatstream_cluster.shared.redis_server import free_port
from chatstream_cluster.shared.semaphore import RedisSemaphore


def recorder(redis: aioredis.Redis, keys: Keys) -> OpsRecorder:
    async def depth() -> int:
        _held, waiting = await RedisSemaphore(redis, keys, keys.model_semaphore("mock")).counts()
        return waiting + await JobQueue(redis, keys, model="mock").undelivered()

    return OpsRecorder(OpsStats(redis, keys), depth)


async def test_a_failed_flush_keeps_its_counts_for_the_next(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    good = recorder(redis, keys)
    await good.flush()  # whatever earlier tests of this process counted
    before = await good.stats.last_minute()

    TOKENS.labels(model="mock").inc(4)
    TOKENS.labels(model="other").inc(3)  # summed over the models
    REJECTED.labels(reason="queue_full", model="mock").inc()
    TTFT.labels(model="mock").observe(0.2)
    down = make_redis(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(Exception):  # noqa: B017 - whichever connection error redis-py raises
            await recorder(down, keys).flush()
    finally:
        await down.aclose()
    await good.flush()
    await good.flush()  # nothing new: nothing counted twice
    after = await good.stats.last_minute()
    assert after["tokens"] - before["tokens"] == 7
    assert after["rejected"]["queue_full"] - before["rejected"]["queue_full"] == 1
    assert after["ttft_samples"] - before["ttft_samples"] == 1
