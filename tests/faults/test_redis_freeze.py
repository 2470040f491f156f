"""Redis frozen (SIGSTOP): every route answers at once, open streams survive the pause.

A frozen Redis accepts connections and never answers, the worst case for a client. Every Redis
command of the gateway is bounded by `--redis-timeout`, so each route that needs Redis answers
503 within ~2 s and the probes and metrics keep answering; the dispatcher's pub/sub connection
has its own liveness check, so a stream that was open carries on, whole, once Redis does.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.cluster import wait_until
from tests.faults.test_worker_crash import StreamReader, expected

pytestmark = pytest.mark.slow

CHAT = {"model": "mock", "messages": [{"role": "user", "content": "frozen"}], "max_tokens": 3}
NEEDS_REDIS = [
    ("GET", "/admin/status", None),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/chat_stream", {"user_input": "hello"}),
    ("GET", "/get_prompt", None),
    ("POST", "/clear_context", None),
    ("POST", "/set_generation_params", {"temperature": 0.5}),
    ("GET", "/get_generation_params", None),
    ("POST", "/set_feedback", {"is_like": True, "message_id": "m"}),
    ("GET", "/get_load", None),
    ("GET", "/get_resource_usage", None),
]
NO_REDIS = [("GET", "/healthz", None), ("GET", "/v1/models", None), ("GET", "/metrics", None)]


def test_frozen_redis_gets_503_within_2s_everywhere_and_streams_resume(own_redis, own_cluster) -> None:  # noqa: ANN001, E501
    cluster = own_cluster
    cluster.start_worker("mock", mock_tokens_per_s=40)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    cookies = httpx.post(gateway.url + "/chat_stream", json={"user_input": "hi"},
                         timeout=10).cookies
    reader = StreamReader(gateway.url, "through the freeze", 160)
    reader.start()
    assert reader.started_text.wait(15)

    # One client for all calls: a new httpx client per call costs ~0.2 s of CPU (TLS context),
    # which 14 threads at once on a busy machine would add to every measured time.
    client = httpx.Client(base_url=gateway.url, timeout=30, cookies=cookies,
                          limits=httpx.Limits(max_connections=32))

    def call(route: tuple) -> tuple[str, int, float, str]:
        method, path, body = route
        started = time.monotonic()
        resp = client.request(method, path, json=body)
        return path, resp.status_code, time.monotonic() - started, resp.text[:200]

    def not_ready() -> tuple[str, int, float, str]:
        """/readyz reads the gateway's view of Redis (refreshed in the background), so it
        answers at once: the time that counts is until it says 503."""
        while (resp := client.get("/readyz")).status_code == 200:
            time.sleep(0.05)
        return "/readyz", resp.status_code, time.monotonic() - frozen_at, resp.text[:200]

    routes = NEEDS_REDIS + NO_REDIS
    with client, ThreadPoolExecutor(len(routes) + 1) as pool:
        list(pool.map(call, [("GET", "/healthz", None)] * len(routes)))  # open the connections
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            readyz = pool.submit(not_ready)
            results = [readyz.result(), *pool.map(call, routes)]
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
    print("\n" + "\n".join(f"{path:28} {status} {took:.2f}s" for path, status, took, _ in results))
    results = results[1:] + results[:1]  # /readyz with the routes that need Redis
    for path, status, took, text in results[:len(NEEDS_REDIS)] + results[-1:]:
        assert status == 503, (path, status, text)
        assert "redis" in text.lower(), (path, text)
        assert took <= 2.0, (path, took)
    for path, status, took, text in results[len(NEEDS_REDIS):-1]:
        assert status == 200, (path, status, text)
        assert took <= 2.0, (path, took)
    # Redis answers again: the open stream finishes whole, new requests work.
    assert reader.done.wait(60)
    assert reader.errors == [] and reader.text == expected("through the freeze", 160)
    wait_until(lambda: httpx.post(gateway.url + "/v1/chat/completions", json=CHAT,
                                  timeout=10).status_code == 200, 15, interval=0.2,
               what="a request to succeed after the freeze")
