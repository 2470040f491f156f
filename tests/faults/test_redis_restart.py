"""Redis is SIGKILLed and restarted (append-only on): fail fast while down, resume after."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.cluster import wait_until
from tests.faults.test_worker_crash import StreamReader, expected

pytestmark = pytest.mark.slow


def _chat(url: str, timeout: float = 10) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        timeout=timeout,
        json={"model": "mock", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 3},
    )


def test_redis_crash_fails_fast_then_everything_resumes(own_redis, own_cluster) -> None:  # noqa: ANN001
    cluster = own_cluster
    cluster.start_worker("mock", max_batch=1, mock_tokens_per_s=25)
    gateway = cluster.start_gateway(max_concurrent=4)
    cluster.wait_ready(gateway)
    # One job running, two queued behind it in the job stream.
    readers = [StreamReader(gateway.url, f"before crash {i}", 40) for i in range(3)]
    for r in readers:
        r.start()
    wait_until(
        lambda: httpx.get(gateway.url + "/admin/status").json()["undelivered_jobs"] == 2,
        15,
        what="one job running and two queued",
    )
    own_redis.kill()

    started = time.monotonic()
    resp = _chat(gateway.url)
    assert resp.status_code == 503
    assert time.monotonic() - started < 5
    assert "redis" in resp.json()["error"]["message"].lower()

    own_redis.restart()
    wait_until(
        lambda: _chat(gateway.url).status_code == 200,
        30,
        interval=0.5,
        what="a new request to succeed after the restart",
    )
    for r in readers:
        assert r.done.wait(60)
        assert r.errors == [], r.errors
        assert r.text == expected(r.content, 40)
