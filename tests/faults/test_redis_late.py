"""A gateway started before its Redis: it binds, says it is alive but not ready, and becomes
ready by itself once Redis and a worker are there (what an orchestrator expects)."""

from __future__ import annotations

import httpx
import pytest

from chatstream_cluster.shared.redis_server import RedisServer
from tests.cluster import Cluster, wait_until

pytestmark = pytest.mark.slow

CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def readyz(url: str) -> httpx.Response:
    return httpx.get(url + "/readyz", timeout=5)


def test_a_gateway_started_before_redis_serves_healthz_then_becomes_ready(  # noqa: ANN001
    key_prefix, tmp_path
) -> None:
    redis = RedisServer(tmp_path / "redis", appendonly=False)  # a port, nothing listening yet
    procs = Cluster(redis.url, key_prefix, tmp_path)
    try:
        gateway = procs.start_gateway(start_within=30)  # returns once /healthz answers 200
        assert "redis not reachable at start-up" in gateway.log()  # a warning, not an exit
        not_ready = readyz(gateway.url)
        assert not_ready.status_code == 503 and not_ready.json()["redis"] is False
        refused = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=15)
        assert refused.status_code == 503, refused.text

        redis.start()
        body = wait_until(lambda: (r := readyz(gateway.url).json())["redis"] and
                          r["subscribed"] and r, 30, what="the gateway to reach Redis")
        assert body["status"] == "not_ready" and body["workers"] == 0  # no worker yet
        procs.start_worker("mock")
        wait_until(lambda: readyz(gateway.url).status_code == 200, 30, what="ready")
        reply = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=15)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 3
        assert gateway.alive() and gateway.process.returncode is None  # the same process
    finally:
        procs.stop()
        redis.stop()
