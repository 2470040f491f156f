"""Share this gateway's counters with the cluster: a background task that, about once a second,
adds what the process's Prometheus counters gained since the last flush (tokens, rejections by
reason, the TTFT histogram) and a queue depth sample into Redis (`shared.ops_stats`).

It reads the same metric objects `/metrics` exports, so the cluster-wide figures of
`/admin/status` are sums of exactly what the gateways' `/metrics` count. The counters are
process-wide, so the deltas are taken once per process (`_Snapshot`), however many gateway
states the process holds. A failed flush keeps its deltas for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable

from chatstream_cluster.gateway.metrics import REJECTED, TOKENS, TTFT
from chatstream_cluster.shared.ops_stats import REJECTED_FIELD, TTFT_FIELD, OpsStats
from chatstream_cluster.shared.ops_stats import TOKENS as TOKENS_FIELD
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS, reraise_if_cancelling

log = logging.getLogger("chatstream.gateway")

FLUSH_INTERVAL_S = 1.0


def read_counters() -> tuple[dict[str, float], float]:
    """The process's cumulative counts as ops_stats fields, and the TTFT sum in seconds."""
    counts: dict[str, float] = {}
    ttft_sum = 0.0
    for family in (*REJECTED.collect(), *TOKENS.collect(), *TTFT.collect()):
        for sample in family.samples:  # summed over the models
            field = None
            if sample.name == "chatstream_rejected_total":
                field = REJECTED_FIELD + sample.labels["reason"]
            elif sample.name == "chatstream_generated_tokens_total":
                field = TOKENS_FIELD
            elif sample.name == "chatstream_time_to_first_token_seconds_bucket":
                field = TTFT_FIELD + sample.labels["le"]
            elif sample.name == "chatstream_time_to_first_token_seconds_sum":
                ttft_sum += sample.value
            if field is not None:
                counts[field] = counts.get(field, 0.0) + sample.value
    return counts, ttft_sum


class _Snapshot:
    """The counts already handed out in this process: each increment is flushed once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, float] = {}
        self.ttft_sum = 0.0

    def take(self) -> tuple[dict[str, int], float, Callable[[bool], None]]:
        """(deltas, ttft delta, done): call done(True) once written, done(False) to give back."""
        with self.lock:
            counts, ttft_sum = read_counters()
            deltas = {k: int(v - self.counts.get(k, 0)) for k, v in counts.items()}
            deltas = {k: d for k, d in deltas.items() if d}
            ttft = ttft_sum - self.ttft_sum
            self.counts, self.ttft_sum = counts, ttft_sum

        def done(written: bool) -> None:
            if written:
                return
            with self.lock:  # give the deltas back: the next flush sends them
                for k, d in deltas.items():
                    self.counts[k] = self.counts.get(k, 0) - d
                self.ttft_sum -= ttft

        return deltas, ttft, done


_SNAPSHOT = _Snapshot()


class OpsRecorder:
    """Flushes this process's counter deltas and a queue depth sample every second.

    `queue_depth` reads the cluster's queue depth (every model's, summed) from Redis."""

    def __init__(self, stats: OpsStats, queue_depth: Callable[[], Awaitable[int]],
                 interval: float = FLUSH_INTERVAL_S) -> None:
        self.stats = stats
        self.queue_depth = queue_depth
        self.interval = interval

    async def flush_last(self) -> None:
        """At shutdown (after `run` was cancelled): write what the last second counted."""
        with contextlib.suppress(*TRANSIENT_REDIS_ERRORS, TimeoutError):
            async with asyncio.timeout(1.0):
                await self.flush()

    async def flush(self) -> None:
        """One flush; raises Redis errors (the deltas are kept for the next flush)."""
        deltas, ttft, done = _SNAPSHOT.take()
        try:
            depth = await self.queue_depth()
            await self.stats.add(deltas, ttft_sum=ttft, queue_depth=depth)
        except BaseException:
            done(False)
            raise
        done(True)

    async def run(self) -> None:
        """Flush every `interval`, forever (a supervised task); a failed flush is logged and
        the loop goes on."""
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
                failing = False
            except TRANSIENT_REDIS_ERRORS as exc:
                reraise_if_cancelling()
                if not failing:
                    log.warning("ops stats: cannot write to Redis", extra={"error": str(exc)})
                failing = True

