"""Cluster-wide ops figures over time: what every gateway served, summed in Redis per 5 s.

Counters and the TTFT histogram live in each gateway process (Prometheus). To show one
cluster-wide figure for "the last minute", every gateway adds what it counted since its
previous flush (about once a second) into the Redis hash of the current time bucket
(`Keys.stats_bucket`), and samples the queue depth into the same hash (the bucket keeps the
highest sample). Readers sum the buckets:

- `last_minute`: the 12 newest buckets (the current one partly filled): tokens/s, TTFT p50 and
  p99, rejected requests by reason, finished TTFT samples;
- `history`: the last 10 minutes, one point per bucket: tokens/s, highest queue depth,
  rejected requests.

Buckets are numbered by wall-clock time (`time.time() // BUCKET_S`), so gateways and readers
must have synchronised clocks (NTP); a skew of a second moves a few counts into the
neighbouring bucket. Each bucket expires after `KEEP_S`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis

from chatstream_cluster.shared.keys import Keys

BUCKET_S = 5
WINDOW_S = 60
HISTORY_S = 600
KEEP_S = HISTORY_S + 60
TTFT_FIELD = "ttft_le:"
REJECTED_FIELD = "rejected:"
TOKENS = "tokens"
TTFT_SUM = "ttft_sum"
QUEUE_DEPTH = "queue_depth"
#: Why admission refuses a request: the `reason` label of chatstream_rejected_total.
REJECT_REASONS = ("queue_full", "queue_timeout", "per_key_limit")

# KEYS: the bucket hash. ARGV: ttl_ms, queue depth sample ('' = none), ttft seconds to add,
# then field, integer delta pairs. The bucket keeps the highest queue depth sample.
_ADD = """
if ARGV[2] ~= '' then
  local cur = tonumber(redis.call('HGET', KEYS[1], 'queue_depth') or '-1')
  if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], 'queue_depth', ARGV[2]) end
end
if tonumber(ARGV[3]) ~= 0 then redis.call('HINCRBYFLOAT', KEYS[1], 'ttft_sum', ARGV[3]) end
for i = 4, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


def bucket_of(t: float) -> int:
    """The bucket number of wall-clock time `t` (seconds)."""
    return int(t // BUCKET_S)


def histogram_quantile(q: float, cumulative: Mapping[float, float]) -> float | None:
    """The q-quantile of a histogram given as {upper bound: cumulative count}, +Inf included,
    interpolated linearly inside the bucket as Prometheus' `histogram_quantile` does. None
    without samples; the highest finite bound when the quantile falls in the +Inf bucket."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    total = cumulative[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


class OpsStats:
    """Write one gateway's deltas into the time buckets; read the cluster's sums back."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._add = redis.register_script(_ADD)

    async def add(
        self,
        counts: Mapping[str, int],
        *,
        ttft_sum: float = 0.0,
        queue_depth: int | None = None,
        now: float | None = None,
    ) -> None:
        """Add integer `counts` (fields: `tokens`, `rejected:<reason>`, `ttft_le:<bound>`),
        the TTFT seconds and a queue depth sample to the bucket of `now`."""
        t = time.time() if now is None else now
        args: list[Any] = [KEEP_S * 1000, "" if queue_depth is None else int(queue_depth),
                           repr(float(ttft_sum))]
        for name, delta in counts.items():
            if delta:
                args += [name, int(delta)]
        await self._add(keys=[self.keys.stats_bucket(bucket_of(t))], args=args)

    async def _buckets(self, first: int, last: int) -> list[dict[str, str]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for b in range(first, last + 1):
                pipe.hgetall(self.keys.stats_bucket(b))
            rows = await pipe.execute()
        return [{_s(k): _s(v) for k, v in row.items()} for row in rows]

    async def last_minute(self, now: float | None = None) -> dict[str, Any]:
        """Cluster-wide figures over the last `WINDOW_S` seconds (see the module docstring)."""
        t = time.time() if now is None else now
        current = bucket_of(t)
        count = WINDOW_S // BUCKET_S
        rows = await self._buckets(current - count + 1, current)
        seconds = (count - 1) * BUCKET_S + (t - current * BUCKET_S)
        tokens = sum(int(r.get(TOKENS, 0)) for r in rows)
        rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        ttft: dict[float, float] = {}
        for row in rows:
            for name, value in row.items():
                if name.startswith(REJECTED_FIELD):
                    reason = name[len(REJECTED_FIELD):]
                    rejected[reason] = rejected.get(reason, 0) + int(value)
                elif name.startswith(TTFT_FIELD):
                    bound = float(name[len(TTFT_FIELD):])
                    ttft[bound] = ttft.get(bound, 0) + int(value)
        p50, p99 = histogram_quantile(0.5, ttft), histogram_quantile(0.99, ttft)
        return {
            "scope": "cluster",
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else 0.0,
            "tokens": tokens,
            "ttft_p50_s": None if p50 is None else round(p50, 4),
            "ttft_p99_s": None if p99 is None else round(p99, 4),
            "ttft_samples": int(max(ttft.values(), default=0)),
            "rejected": rejected,
        }

    async def history(self, now: float | None = None) -> dict[str, Any]:
        """One point per bucket over the last `HISTORY_S` seconds, oldest first: `t` (bucket
        start, epoch s), `tokens_per_s`, `queue_depth` (highest sample) and `rejected`. In a
        bucket no gateway recorded (none was running) all three are None, not 0."""
        t = time.time() if now is None else now
        current = bucket_of(t)
        first = current - HISTORY_S // BUCKET_S + 1
        rows = await self._buckets(first, current)
        points = []
        for b, row in zip(range(first, current + 1), rows, strict=True):
            if not row:
                points.append({"t": b * BUCKET_S, "tokens_per_s": None, "queue_depth": None,
                               "rejected": None})
                continue
            span = BUCKET_S if b < current else max(t - b * BUCKET_S, 1e-3)
            depth = row.get(QUEUE_DEPTH)
            points.append({
                "t": b * BUCKET_S,
                "tokens_per_s": round(int(row.get(TOKENS, 0)) / span, 2),
                "queue_depth": None if depth is None else int(depth),
                "rejected": sum(int(v) for k, v in row.items() if k.startswith(REJECTED_FIELD)),
            })
        return {"scope": "cluster", "bucket_s": BUCKET_S, "seconds": HISTORY_S,
                "points": points}


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
