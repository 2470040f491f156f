"""Prometheus metrics of one gateway process (served by `GET /metrics`).

Counters and the TTFT histogram count this process's requests: sum them across gateways.
The cluster gauges (queue depth, running, capacity, workers) are read from Redis at scrape
time, so every gateway reports the same cluster-wide value: aggregate them with `max`, never
`sum`, when several gateways are scraped (they carry the label `scope="cluster"` to say so).
Per-model figures carry the served model's name in the label `model`: the queue depth of one
model is `max(chatstream_queue_depth{model="..."})`, the cluster's
`sum(max by (model) (chatstream_queue_depth))`. docs/operations.md lists every metric with its
PromQL.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from chatstream_cluster.shared.ops_stats import REJECT_REASONS

REGISTRY = CollectorRegistry(auto_describe=True)

QUEUE_DEPTH = Gauge(
    "chatstream_queue_depth",
    "Requests of a model waiting, cluster-wide: for a permit plus jobs no worker has read "
    "(an autoscaler's signal).", ["scope", "model"], registry=REGISTRY,
)
RUNNING = Gauge(
    "chatstream_running", "Generation permits of a model held cluster-wide.",
    ["scope", "model"], registry=REGISTRY,
)
CAPACITY = Gauge(
    "chatstream_capacity", "Cap on a model's concurrent generations, cluster-wide.",
    ["scope", "model"], registry=REGISTRY,
)
WORKERS = Gauge("chatstream_workers", "Live workers of a model.", ["scope", "model"],
                registry=REGISTRY)
WAITING_IN_WORKERS = Gauge(
    "chatstream_waiting_in_workers",
    "Requests inside a model's workers waiting for a batch slot or KV cache.",
    ["scope", "model"], registry=REGISTRY,
)
MODEL_GAUGES = (QUEUE_DEPTH, RUNNING, CAPACITY, WORKERS, WAITING_IN_WORKERS)
KV_USAGE = Gauge(
    "chatstream_kv_cache_usage_ratio",
    "Share of a worker's KV cache reserved by its running requests (0-1).", ["worker"],
    registry=REGISTRY,
)
# The last minute, summed over every gateway through Redis (shared/ops_stats.py): the figures
# of /admin/status's `last_minute` and of the ops page.
LAST_MINUTE_TOKENS = Gauge(
    "chatstream_last_minute_tokens_per_second",
    "Completion tokens per second relayed over the last minute, cluster-wide.", ["scope"],
    registry=REGISTRY,
)
LAST_MINUTE_TTFT = Gauge(
    "chatstream_last_minute_ttft_seconds",
    "Time to first token over the last minute, cluster-wide, by quantile (0.5, 0.99); absent "
    "without samples.", ["scope", "quantile"], registry=REGISTRY,
)
LAST_MINUTE_REJECTED = Gauge(
    "chatstream_last_minute_rejected",
    "Requests refused by admission over the last minute, cluster-wide, by reason.",
    ["scope", "reason"], registry=REGISTRY,
)
CLUSTER_GAUGES = (QUEUE_DEPTH, RUNNING, CAPACITY, WORKERS, WAITING_IN_WORKERS, KV_USAGE,
                  LAST_MINUTE_TOKENS,
                  LAST_MINUTE_TTFT, LAST_MINUTE_REJECTED)

REJECTED = Counter(
    "chatstream_rejected_total", "Requests refused by admission, by reason and model.",
    ["reason", "model"], registry=REGISTRY,
)
REQUESTS = Counter(
    "chatstream_requests_total", "Finished requests.", ["route", "status"], registry=REGISTRY
)
TTFT = Histogram(
    "chatstream_time_to_first_token_seconds", "Request arrival to first generated text, by model.",
    ["model"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
TOKENS = Counter(
    "chatstream_generated_tokens_total", "Completion tokens relayed to clients, by model.",
    ["model"], registry=REGISTRY,
)
OPEN_STREAMS = Gauge(
    "chatstream_open_streams", "Streams this gateway is relaying now.", registry=REGISTRY
)
TRUNCATED = Counter(
    "chatstream_streams_truncated_total",
    "Streams that began and did not end normally (stop/length), by reason: "
    "client_disconnected, or the error code the client got (no_worker, redis_unavailable, "
    "stream_resumed_elsewhere, permit_lapsed, a worker's error code, ...).",
    ["reason"], registry=REGISTRY,
)
RESUMES = Counter(
    "chatstream_resumes_total",
    "Resumes (Last-Event-ID) by outcome: attached (running), requeued (parked, continued), "
    "replayed (finished), requeued_live (parked under a live client), expired, not_found.",
    ["outcome"], registry=REGISTRY,
)
PERMITS_LAPSED = Counter(
    "chatstream_permits_lapsed_total",
    "Permits found gone at refresh: retaken within the cap, or ended (their stream got "
    "permit_lapsed).", ["outcome"], registry=REGISTRY,
)
TASK_FAILURES = Counter(
    "chatstream_background_task_failures_total",
    "Crashes of this process's supervised background tasks (each restarted with backoff).",
    ["task"], registry=REGISTRY,
)
for _reason in ("client_disconnected", "no_worker", "redis_unavailable"):
    TRUNCATED.labels(reason=_reason)
for _outcome in ("attached", "requeued", "replayed", "expired", "not_found"):
    RESUMES.labels(outcome=_outcome)
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
for _reason in ("headers_too_large", "header_too_large", "url_too_long", "header_timeout",
                "body_timeout", "too_many_connections", "invalid_http"):
    HTTP_REFUSED.labels(reason=_reason)


def prepare_model(model: str) -> None:
    """Create `model`'s per-model series at 0, so `rate()` has a start before its first count."""
    for reason in REJECT_REASONS:
        REJECTED.labels(reason=reason, model=model)
    TOKENS.labels(model=model)
    TTFT.labels(model=model)


def set_cluster_gauges(status: dict[str, Any]) -> None:
    """Copy a `shared.cluster_status` reading into the scope="cluster" gauges."""
    for gauge in (*MODEL_GAUGES, KV_USAGE):
        gauge.clear()  # a model or worker that left takes its series with it
    for m in status["models"]:
        labels = {"scope": "cluster", "model": m["name"]}
        QUEUE_DEPTH.labels(**labels).set(m["queue_depth"])
        RUNNING.labels(**labels).set(m["running"])
        CAPACITY.labels(**labels).set(m["capacity"])
        WORKERS.labels(**labels).set(m["workers"])
        WAITING_IN_WORKERS.labels(**labels).set(m["waiting_in_workers"])
        prepare_model(m["name"])
    for w in status["workers"]:
        if w["kv_tokens_total"]:
            KV_USAGE.labels(worker=w["id"]).set(w["kv_tokens_used"] / w["kv_tokens_total"])
    minute = status.get("last_minute")
    if minute is None:
        return
    LAST_MINUTE_TOKENS.labels(scope="cluster").set(minute["tokens_per_s"])
    LAST_MINUTE_TTFT.clear()
    for quantile, key in (("0.5", "ttft_p50_s"), ("0.99", "ttft_p99_s")):
        if minute[key] is not None:
            LAST_MINUTE_TTFT.labels(scope="cluster", quantile=quantile).set(minute[key])
    for reason, count in minute["rejected"].items():
        LAST_MINUTE_REJECTED.labels(scope="cluster", reason=reason).set(count)


def set_redis_memory(info: dict[str, Any]) -> None:
    """Copy an `INFO memory` reply into the scope="cluster" Redis memory gauges."""
    REDIS_USED_MEMORY.labels(scope="cluster").set(int(info.get("used_memory", 0)))
    REDIS_MAXMEMORY.labels(scope="cluster").set(int(info.get("maxmemory", 0)))
