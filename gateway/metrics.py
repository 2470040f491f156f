"""Prometheus metrics of one gateway process (served by `GET /metrics`).

Counters and the TTFT histogram count this process's requests: sum them across gateways.
The cluster gauges (queue depth, running, capacity, workers) are read from Redis at scrape
time, so every gateway reports the same cluster-wide value: aggregate them with `max`, never
`sum`, when several gateways are scraped (they carry the label `scope="cluster"` to say so).
docs/operations.md lists every metric with its PromQL.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

QUEUE_DEPTH = Gauge(
    "chatstream_queue_depth",
    "Requests waiting, cluster-wide: for a permit plus jobs no worker has read.",
    ["scope"], registry=REGISTRY,
)
RUNNING = Gauge(
    "chatstream_running", "Generation permits held cluster-wide.", ["scope"], registry=REGISTRY
)
CAPACITY = Gauge(
    "chatstream_capacity", "Cluster-wide cap on concurrent generations.", ["scope"],
    registry=REGISTRY,
)
WORKERS = Gauge("chatstream_workers", "Live workers.", ["scope"], registry=REGISTRY)
CLUSTER_GAUGES = (QUEUE_DEPTH, RUNNING, CAPACITY, WORKERS)

REJECTED = Counter(
    "chatstream_rejected_total", "Requests refused by admission, by reason.", ["reason"],
    registry=REGISTRY,
)
REQUESTS = Counter(
    "chatstream_requests_total", "Finished requests.", ["route", "status"], registry=REGISTRY
)
TTFT = Histogram(
    "chatstream_time_to_first_token_seconds", "Request arrival to first generated text.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=REGISTRY,
)
TOKENS = Counter(
    "chatstream_generated_tokens_total", "Completion tokens relayed to clients.", registry=REGISTRY
)
OPEN_STREAMS = Gauge(
    "chatstream_open_streams", "Streams this gateway is relaying now.", registry=REGISTRY
)
HTTP_REFUSED = Counter(
    "chatstream_http_refused_total",
    "Connections the HTTP layer answered itself and closed, by reason (gateway/http_limits.py).",
    ["reason"], registry=REGISTRY,
)
REDIS_USED_MEMORY = Gauge(
    "chatstream_redis_used_memory_bytes", "Memory Redis uses (INFO memory used_memory).",
    ["scope"], registry=REGISTRY,
)
REDIS_MAXMEMORY = Gauge(
    "chatstream_redis_maxmemory_bytes", "Redis's maxmemory; 0 = no limit.", ["scope"],
    registry=REGISTRY,
)
REDIS_GAUGES = (REDIS_USED_MEMORY, REDIS_MAXMEMORY)
for _reason in ("queue_full", "queue_timeout", "per_key_limit"):
    REJECTED.labels(reason=_reason)
for _reason in ("headers_too_large", "header_too_large", "url_too_long", "header_timeout",
                "body_timeout", "too_many_connections", "invalid_http"):
    HTTP_REFUSED.labels(reason=_reason)


def set_cluster_gauges(status: dict[str, Any]) -> None:
    """Copy a `shared.cluster_status` reading into the scope="cluster" gauges."""
    QUEUE_DEPTH.labels(scope="cluster").set(status["queue_depth"])
    RUNNING.labels(scope="cluster").set(status["running"])
    CAPACITY.labels(scope="cluster").set(status["capacity"])
    WORKERS.labels(scope="cluster").set(len(status["workers"]))


def set_redis_memory(info: dict[str, Any]) -> None:
    """Copy an `INFO memory` reply into the scope="cluster" Redis memory gauges."""
    REDIS_USED_MEMORY.labels(scope="cluster").set(int(info.get("used_memory", 0)))
    REDIS_MAXMEMORY.labels(scope="cluster").set(int(info.get("maxmemory", 0)))
