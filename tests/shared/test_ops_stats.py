"""shared/ops_stats.py against a real redis-server: gateways' deltas summed per time bucket."""

from __future__ import annotations

import math

import pytest
import redis.asyncio as aioredis

from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.ops_stats import (
    BUCKET_S,
    HISTORY_S,
    KEEP_S,
    REJECT_REASONS,
    OpsStats,
    bucket_of,
    histogram_quantile,
)
from chatstream_cluster.status import render_table

INF = math.inf
NOW = 1_800_000_002.5  # 2.5 s into a bucket


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    cumulative = {0.1: 50, 0.5: 100, 1.0: 100, INF: 100}
    assert histogram_quantile(0.5, cumulative) == pytest.approx(0.1)
    assert histogram_quantile(0.99, cumulative) == pytest.approx(0.1 + 0.4 * 49 / 50)
    assert histogram_quantile(0.25, cumulative) == pytest.approx(0.05)
    # Past the highest finite bound: that bound, as histogram_quantile answers.
    assert histogram_quantile(0.99, {1.0: 10, INF: 20}) == 1.0
    assert histogram_quantile(0.5, {0.1: 0, INF: 0}) is None
    assert histogram_quantile(0.5, {}) is None


async def test_last_minute_sums_every_gateway_over_sixty_seconds(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    stats = OpsStats(redis, keys)
    ttft = {"ttft_le:0.1": 3, "ttft_le:1.0": 4, "ttft_le:+Inf": 4}
    # Two gateways flush into the current bucket, one into a bucket 30 s ago.
    await stats.add({"tokens": 100, "rejected:queue_full": 1, **ttft}, ttft_sum=0.5,
                    queue_depth=2, now=NOW)
    await stats.add({"tokens": 20, "rejected:per_key_limit": 2}, queue_depth=5, now=NOW - 0.5)
    await stats.add({"tokens": 60, **ttft}, ttft_sum=0.4, queue_depth=1, now=NOW - 30)
    # Older than a minute: not counted.
    await stats.add({"tokens": 1000, "rejected:queue_full": 50}, now=NOW - 65)

    minute = await stats.last_minute(now=NOW)
    seconds = 55 + 2.5
    assert minute["scope"] == "cluster"
    assert minute["seconds"] == pytest.approx(seconds)
    assert minute["tokens"] == 180
    assert minute["tokens_per_s"] == pytest.approx(180 / seconds, abs=0.01)
    assert minute["rejected"] == {**dict.fromkeys(REJECT_REASONS, 0), "queue_full": 1,
                                  "per_key_limit": 2}
    assert minute["ttft_samples"] == 8
    assert minute["ttft_p50_s"] == pytest.approx(0.1 * 4 / 6, abs=1e-4)
    assert minute["ttft_p99_s"] == pytest.approx(0.1 + 0.9 * (7.92 - 6) / 2, abs=1e-4)

    history = await stats.history(now=NOW)
    points = history["points"]
    assert (history["bucket_s"], len(points)) == (BUCKET_S, HISTORY_S // BUCKET_S)
    assert points[-1]["t"] == bucket_of(NOW) * BUCKET_S
    assert points[-1]["queue_depth"] == 5  # the highest sample of the bucket
    assert points[-1]["tokens_per_s"] == pytest.approx(120 / 2.5)
    assert points[-1]["rejected"] == 3
    assert points[-7]["tokens_per_s"] == 60 / BUCKET_S and points[-7]["queue_depth"] == 1
    assert points[-14]["rejected"] == 50
    assert points[-2] == {"t": points[-1]["t"] - BUCKET_S, "tokens_per_s": None,
                          "queue_depth": None, "rejected": None}  # nobody recorded
    ttl = await redis.pttl(keys.stats_bucket(bucket_of(NOW)))
    assert 0 < ttl <= KEEP_S * 1000


def test_status_table_shows_the_last_minute() -> None:
    text = render_table({
        "queue_depth": 0, "waiting_for_permit": 0, "undelivered_jobs": 0, "running": 0,
        "capacity": 4, "gateways": [], "workers": [],
        "last_minute": {"tokens_per_s": 12.5, "ttft_p50_s": 0.04, "ttft_p99_s": None,
                        "rejected": {"queue_full": 3}},
    })
    line = text.splitlines()[1]
    assert line.startswith("last minute (cluster): 12.5 tok/s")
    assert "p50 0.04s p99 -" in line and "queue_full 3" in line
