"""The ops figures: last-minute tokens/s, TTFT percentiles and rejections, summed over every
gateway through Redis, the same in `/admin/status`, `/metrics` and `/admin/history` of any
gateway; and the browser pages' routes, open, off with --no-ui / --no-ops-page."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import wait_until_async as until

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
ADMIN = {"Authorization": "Bearer ops-figures-admin"}


def body(content: str, max_tokens: int) -> dict[str, Any]:
    return {"model": "mock", "messages": [{"role": "user", "content": content}],
            "stream": True, "max_tokens": max_tokens}


def gauges(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("chatstream_last_minute")}


async def test_last_minute_figures_are_cluster_wide_and_agree(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", mock_tokens_per_s=40, max_batch=4)
    gateways = [cluster.start_gateway(admin_key="ops-figures-admin", max_concurrent=1,
                                      max_queue=0) for _ in range(2)]
    for gw in gateways:
        cluster.wait_ready(gw)
    a, b = gateways
    async with httpx.AsyncClient(timeout=30) as client:
        # An 80-token stream through one gateway, a 12-token one through the other; while the
        # first holds the only slot (2 s), each gateway refuses one request (429, queue_full).
        async with client.stream("POST", a.url + CHAT, json=body("first", 80)) as held:
            assert held.status_code == 200
            lines = held.aiter_lines()
            while '"content":"' not in await anext(lines):
                pass
            refused = [(await client.post(gw.url + CHAT, json=body("no", 3))).status_code
                       for gw in gateways]
            async for _ in lines:
                pass
        assert refused == [429, 429]
        done = await client.post(b.url + CHAT, json=body("second", 12))
        assert done.status_code == 200

        async def settled() -> dict[str, Any] | None:
            status = (await client.get(a.url + "/admin/status", headers=ADMIN)).json()
            m = status["last_minute"]
            return status if (m["tokens"], m["ttft_samples"]) == (92, 2) else None

        status = await until(settled, 10, "both gateways' counts to reach Redis")
        minute = status["last_minute"]
        assert minute["scope"] == "cluster"
        assert minute["rejected"]["queue_full"] == 2 and minute["rejected"]["queue_timeout"] == 0
        assert 0 < minute["ttft_p50_s"] <= minute["ttft_p99_s"] < 10
        assert 0 < minute["tokens_per_s"] <= 92 / 50  # 92 tokens over the covered ~55-60 s

        # Every gateway answers the same figures, in /admin/status and in /metrics.
        other, metrics = await asyncio.gather(
            client.get(b.url + "/admin/status", headers=ADMIN),
            client.get(b.url + "/metrics", headers=ADMIN))
        theirs = other.json()["last_minute"]
        for key in ("tokens", "ttft_p50_s", "ttft_p99_s", "ttft_samples", "rejected"):
            assert theirs[key] == minute[key], key
        scraped = gauges(metrics.text)
        cluster_scope = ("scope", "cluster")

        def gauge(name: str, **labels: str) -> float:
            return scraped[(name, frozenset({cluster_scope, *labels.items()}))]

        assert gauge("chatstream_last_minute_rejected", reason="queue_full") == 2
        assert gauge("chatstream_last_minute_ttft_seconds", quantile="0.5") == minute["ttft_p50_s"]
        assert gauge("chatstream_last_minute_ttft_seconds", quantile="0.99") == \
            minute["ttft_p99_s"]
        assert gauge("chatstream_last_minute_tokens_per_second") == pytest.approx(
            minute["tokens_per_s"], rel=0.2)  # the covered seconds grew between the reads

        history = (await client.get(a.url + "/admin/history", headers=ADMIN)).json()
        assert history["bucket_s"] == 5 and len(history["points"]) == 120
        recorded = [p for p in history["points"] if p["tokens_per_s"] is not None]
        assert recorded and all(p["queue_depth"] is not None for p in recorded)
        assert sum(p["tokens_per_s"] * 5 for p in recorded[:-1]) <= 92
        assert sum(p["rejected"] for p in recorded) == 2
        assert (await client.get(a.url + "/admin/history")).status_code == 401


async def test_pages_are_open_and_can_be_turned_off(cluster) -> None:  # noqa: ANN001
    keyed = cluster.start_gateway(api_keys=["sk-pages"], admin_key="pages-admin",
                                  ui_title="Team <chat>", ui_welcome_message="Hi & welcome")
    bare = cluster.start_gateway(ui=False, ops_page=False)
    ops_only = cluster.start_gateway(ui=False)
    async with httpx.AsyncClient(timeout=10) as client:
        for path, kind in (("/", "text/html"), ("/chatstream.js", "text/javascript"),
                           ("/ui/style.css", "text/css"), ("/ui/ops.js", "text/javascript"),
                           ("/admin", "text/html")):
            resp = await client.get(keyed.url + path)  # no key: the pages hold no data
            assert resp.status_code == 200, path
            assert resp.headers["content-type"].startswith(kind)
            assert "script-src 'self'" in resp.headers["content-security-policy"]
            assert (await client.get(bare.url + path)).status_code == 404, path
        page = (await client.get(keyed.url + "/")).text
        assert '"apiKeyRequired": true' in page and "sk-pages" not in page
        assert "<title>Team &lt;chat&gt;</title>" in page
        assert '"welcomeMessage": "Hi \\u0026 welcome"' in page  # inert JSON, escaped
        assert "pages-admin" not in (await client.get(keyed.url + "/admin")).text
        assert (await client.get(keyed.url + "/ui/../admin/status")).status_code in (401, 404)
        assert (await client.get(keyed.url + "/ui/index.html")).status_code == 404
        assert (await client.get(keyed.url + "/admin/status")).status_code == 401
        assert (await client.get(keyed.url + "/chat_stream")).status_code == 401
        assert (await client.get(ops_only.url + "/")).status_code == 404
        for path in ("/admin", "/ui/style.css", "/ui/ops.js"):
            assert (await client.get(ops_only.url + path)).status_code == 200, path
