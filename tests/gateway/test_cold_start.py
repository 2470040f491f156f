"""Scale from zero (`--cold-start-timeout`), through real gateway and worker processes: a
request for a known model with no worker waits in that model's line, kept alive with SSE
comments, shows in the model's queue depth, and is served once a worker starts; a worker that
never comes ends the stream with an explicit error, never a finish reason."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import wait_until
from tests.sse import CHAT, expected, open_stream

pytestmark = pytest.mark.slow


def body(model: str, content: str, max_tokens: int, *, stream: bool = True) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "stream": stream}


def queue_depth(gateway, model: str) -> float | None:  # noqa: ANN001
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "chatstream_queue_depth" and s.labels.get("model") == model:
                return s.value
    return None


def test_a_request_waits_for_the_first_worker_with_keepalives(cluster) -> None:  # noqa: ANN001
    gateway = cluster.start_gateway(cold_start_timeout=60, models=["cold"])
    ready = wait_until(lambda: httpx.get(gateway.url + "/readyz", timeout=2).status_code == 200,
                       10, what="a ready gateway without any worker")
    assert ready
    assert httpx.get(gateway.url + "/v1/models", timeout=5).json()["data"] == []

    with open_stream(gateway.url, body("cold", "wake up", 4), timeout=60) as (resp, record):
        assert resp.status_code == 200  # answered at once, before any worker exists
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = record.lines
        comments, started = [], time.monotonic()
        while len(comments) < 2:  # one at once, one every KEEPALIVE_S (5 s) after
            line = next(lines)
            assert not line.startswith("data:"), line
            if line.startswith(":"):
                comments.append(line)
        assert time.monotonic() - started > 4
        assert comments[0].startswith(": waiting for a worker")
        # The waiting demand is what an autoscaler reads.
        assert queue_depth(gateway, "cold") == 1
        cluster.start_worker("mock", served_model_name="cold")
        record.feed()
    assert (record.finish, record.text, record.errors, record.done) == (
        "length", expected("wake up", 4), [], True)
    assert queue_depth(gateway, "cold") == 0


def test_a_worker_that_never_starts_is_an_explicit_error(cluster) -> None:  # noqa: ANN001
    gateway = cluster.start_gateway(cold_start_timeout=2, queue_timeout=60, models=["cold"])
    wait_until(lambda: httpx.get(gateway.url + "/readyz", timeout=2).status_code == 200, 10,
               what="a ready gateway")
    started = time.monotonic()
    with open_stream(gateway.url, body("cold", "nobody", 4), timeout=30) as (resp, record):
        assert resp.status_code == 200
        record.feed()
    assert 1.5 < time.monotonic() - started < 15  # --cold-start-timeout, not --queue-timeout
    assert record.finish is None and record.text == ""  # never looks complete
    assert record.error_code == "cold_start_timeout" and record.done
    assert "'cold'" in record.errors[0]["message"]

    plain = httpx.post(gateway.url + CHAT, json=body("cold", "nobody", 4, stream=False),
                       timeout=30)
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "cold_start_timeout"
    assert queue_depth(gateway, "cold") == 0  # both left the line

    unknown = httpx.post(gateway.url + CHAT, json=body("other", "x", 4), timeout=10)
    assert unknown.status_code == 404  # no wait for a model the cluster does not know


def test_a_client_that_leaves_a_cold_start_leaves_the_line(cluster) -> None:  # noqa: ANN001
    gateway = cluster.start_gateway(cold_start_timeout=60, models=["cold"])
    wait_until(lambda: httpx.get(gateway.url + "/readyz", timeout=2).status_code == 200, 10,
               what="a ready gateway")
    with open_stream(gateway.url, body("cold", "impatient", 4), timeout=30) as (_resp, record):
        assert next(record.lines).startswith(":")
        wait_until(lambda: queue_depth(gateway, "cold") == 1, 10, what="the request in line")
    wait_until(lambda: queue_depth(gateway, "cold") == 0, 10, what="the line to empty")
    status = httpx.get(gateway.url + "/admin/status", timeout=5).json()
    assert (status["waiting_for_permit"], status["undelivered_jobs"], status["running"]) == (
        0, 0, 0)  # it left before it had a permit: nothing was enqueued for a later worker
