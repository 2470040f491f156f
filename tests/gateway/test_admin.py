"""`/admin/status` and `/metrics` through real gateway and worker processes on a real Redis."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatstream_cluster.shared.redis_server import RedisServer
from tests.cluster import Cluster
from tests.cluster import wait_until_async as until

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
WORKER_FIELDS = {"id", "pid", "host", "model", "device", "running", "max_batch",
                 "last_heartbeat_s"}


def chat_body(content: str, max_tokens: int, *, stream: bool = True) -> dict[str, Any]:
    return {"model": "mock", "messages": [{"role": "user", "content": content}],
            "stream": stream, "max_tokens": max_tokens}



@asynccontextmanager
async def generating(client: httpx.AsyncClient, url: str, content: str) -> AsyncIterator[None]:
    """A long stream that has produced text; the client leaves when the block ends."""
    async with client.stream("POST", url + CHAT, json=chat_body(content, 400)) as resp:
        assert resp.status_code == 200
        lines = resp.aiter_lines()  # kept open: closing it early would close the connection
        line = ""
        while '"content":"' not in line or '"content":""' in line:
            line = await anext(lines)
        yield
        await lines.aclose()


async def status_of(client: httpx.AsyncClient, gateway) -> dict[str, Any]:  # noqa: ANN001
    resp = await client.get(gateway.url + "/admin/status")
    assert resp.status_code == 200, resp.text
    return resp.json()


def scrape(gateway) -> dict[tuple[str, frozenset], float]:  # noqa: ANN001
    """Every sample of the gateway's /metrics: (name, labels) -> value."""
    resp = httpx.get(gateway.url + "/metrics", timeout=5)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples that carry `labels` (and any others, e.g. `model`)."""
    found = [v for (n, have), v in samples.items()
             if n == name and frozenset(labels.items()) <= have]
    if not found:
        raise KeyError((name, labels))
    return sum(found)


CLUSTER = {"scope": "cluster"}


async def test_status_lists_live_workers_with_every_field_and_drops_dead_ones(
    cluster,  # noqa: ANN001
) -> None:
    ttl = 1.0
    keep = cluster.start_worker("mock", mock_tokens_per_s=20, max_batch=3, worker_ttl=ttl)
    doomed = cluster.start_worker("mock", mock_tokens_per_s=20, max_batch=5, worker_ttl=ttl)
    gw = cluster.start_gateway()
    cluster.wait_ready(gw, workers=2)
    async with httpx.AsyncClient(timeout=10) as client:
        status = await status_of(client, gw)
        assert {"queue_depth", "running", "capacity", "workers"} <= status.keys()
        assert (status["queue_depth"], status["running"], status["capacity"]) == (0, 0, 8)
        by_id = {w["id"]: w for w in status["workers"]}
        assert set(by_id) == {keep.settings["worker_id"], doomed.settings["worker_id"]}
        for proc, max_batch in ((keep, 3), (doomed, 5)):
            w = by_id[proc.settings["worker_id"]]
            assert WORKER_FIELDS <= w.keys()
            assert w["pid"] == proc.pid
            assert w["host"] == socket.gethostname()
            assert (w["model"], w["device"], w["max_batch"], w["running"]) == (
                "mock", "cpu", max_batch, 0)
            assert 0 <= w["last_heartbeat_s"] < ttl

        # A running generation shows in `running` and in its worker's `running`.
        async with generating(client, gw.url, "counted"):

            async def one_running() -> dict[str, Any] | None:
                s = await status_of(client, gw)
                busy = sum(w["running"] for w in s["workers"])
                return s if s["running"] == 1 and busy == 1 else None

            await until(one_running, 3, "running == 1 on the gateway and the workers")

        async def idle() -> bool:
            s = await status_of(client, gw)
            return s["running"] == 0 and all(w["running"] == 0 for w in s["workers"])

        await until(idle, 3, "the cancelled generation to leave the worker")

        doomed.kill()
        killed = time.monotonic()

        async def gone() -> dict[str, Any] | None:
            s = await status_of(client, gw)
            return s if [w["id"] for w in s["workers"]] == [keep.settings["worker_id"]] else None

        status = await until(gone, ttl + 2, "the killed worker to leave the list")
        assert time.monotonic() - killed <= ttl + 2
        assert status["capacity"] == 3  # derived from the live workers only


async def test_metrics_expose_every_metric_with_sane_values(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", mock_tokens_per_s=40, max_batch=4)
    gateways = [cluster.start_gateway(max_concurrent=1, max_queue=1) for _ in range(2)]
    for gw in gateways:
        cluster.wait_ready(gw)
    before = [scrape(gw) for gw in gateways]
    for samples in before:
        for name in ("chatstream_queue_depth", "chatstream_running", "chatstream_capacity",
                     "chatstream_workers"):
            assert (name, frozenset({**CLUSTER, "model": "mock"}.items())) in samples, name
        assert value(samples, "chatstream_rejected_total", reason="queue_full") == 0
        assert value(samples, "chatstream_generated_tokens_total") == 0
        assert value(samples, "chatstream_time_to_first_token_seconds_count") == 0

    a, b = gateways
    async with httpx.AsyncClient(timeout=30) as client:
        holder = asyncio.create_task(client.post(a.url + CHAT, json=chat_body("first", 60)))
        await until(lambda: _running(client, a), 5, "the holder to run on the worker")
        waiter = asyncio.create_task(client.post(b.url + CHAT, json=chat_body("second", 5)))
        await until(lambda: _depth(client, a), 5, "the waiter to queue")
        # Full: one running, one waiting. Each gateway refuses one more.
        refused = [await client.post(gw.url + CHAT, json=chat_body("no", 5)) for gw in gateways]
        # Both gateways report the same cluster-wide gauges: aggregate with max, not sum.
        during = [scrape(gw) for gw in gateways]
        for samples in during:
            assert value(samples, "chatstream_queue_depth", **CLUSTER) == 1
            assert value(samples, "chatstream_running", **CLUSTER) == 1
            assert value(samples, "chatstream_capacity", **CLUSTER) == 1
            assert value(samples, "chatstream_workers", **CLUSTER) == 1
        served = [await holder, await waiter]
    assert [r.status_code for r in refused] == [429, 429]
    assert [r.status_code for r in served] == [200, 200]

    after = [scrape(gw) for gw in gateways]
    total = {name: sum(value(s, name, **labels) for s in after) for name, labels in (
        ("chatstream_rejected_total", {"reason": "queue_full"}),
        ("chatstream_generated_tokens_total", {}),
        ("chatstream_time_to_first_token_seconds_count", {}),
        ("chatstream_time_to_first_token_seconds_sum", {}),
    )}
    assert total["chatstream_rejected_total"] == 2  # the two 429s, one on each gateway
    for samples in after:
        assert value(samples, "chatstream_rejected_total", reason="queue_full") == 1
        assert value(samples, "chatstream_rejected_total", reason="queue_timeout") == 0
    assert total["chatstream_generated_tokens_total"] == 60 + 5
    assert total["chatstream_time_to_first_token_seconds_count"] == 2
    assert 0 < total["chatstream_time_to_first_token_seconds_sum"] < 30
    for samples in after:  # a well-formed histogram: cumulative buckets ending at the count
        buckets = sorted(
            (float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
            if name == "chatstream_time_to_first_token_seconds_bucket"
        )
        counts = [v for _, v in buckets]
        assert counts == sorted(counts)
        assert buckets[-1] == (float("inf"),
                               value(samples, "chatstream_time_to_first_token_seconds_count"))
    for samples in after:
        assert value(samples, "chatstream_running", **CLUSTER) == 0
        assert value(samples, "chatstream_queue_depth", **CLUSTER) == 0


async def _running(client: httpx.AsyncClient, gw) -> bool:  # noqa: ANN001
    s = await status_of(client, gw)
    busy = sum(w["running"] for w in s["workers"])
    return (s["running"], s["undelivered_jobs"], busy) == (1, 0, 1)


async def _depth(client: httpx.AsyncClient, gw) -> bool:  # noqa: ANN001
    s = await status_of(client, gw)
    return (s["queue_depth"], s["waiting_for_permit"]) == (1, 1)


def test_admin_key_guards_status_and_metrics(cluster) -> None:  # noqa: ANN001
    gw = cluster.start_gateway(admin_key="s3cret-admin")
    for path in ("/admin/status", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-admin"}):
            resp = httpx.get(gw.url + path, headers=headers, timeout=5)
            assert resp.status_code == 401, (path, headers)
            assert resp.json()["error"]["code"] == "invalid_admin_key"
            assert resp.headers["www-authenticate"] == "Bearer"
        ok = httpx.get(gw.url + path, headers={"Authorization": "Bearer s3cret-admin"}, timeout=5)
        assert ok.status_code == 200, (path, ok.text)
    assert httpx.get(gw.url + "/healthz", timeout=5).status_code == 200  # probes stay open
    status = httpx.get(gw.url + "/admin/status", timeout=5,
                       headers={"Authorization": "Bearer s3cret-admin"}).json()
    assert status["workers"] == [] and status["capacity"] == 0


def test_without_redis_metrics_keep_counters_and_status_is_503(tmp_path, key_prefix) -> None:  # noqa: ANN001
    own_redis = RedisServer(tmp_path / "redis", appendonly=False).start()
    procs = Cluster(own_redis.url, key_prefix, tmp_path)
    try:
        procs.start_worker("mock", max_batch=2)
        gw = procs.start_gateway()
        procs.wait_ready(gw)
        assert httpx.post(gw.url + CHAT, json=chat_body("hi", 3, stream=False),
                          timeout=10).status_code == 200
        assert value(scrape(gw), "chatstream_workers", **CLUSTER) == 1
        own_redis.kill()
        samples = scrape(gw)  # still 200: this gateway's counters are worth scraping
        assert value(samples, "chatstream_generated_tokens_total") == 3
        assert value(samples, "chatstream_time_to_first_token_seconds_count") == 1
        for name in ("chatstream_queue_depth", "chatstream_running", "chatstream_capacity",
                     "chatstream_workers"):  # left out, not stale: max() over gateways holds
            assert not any(n == name for n, _ in samples), name
        resp = httpx.get(gw.url + "/admin/status", timeout=10)
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "redis_unavailable"
    finally:
        procs.stop()
        own_redis.stop()
