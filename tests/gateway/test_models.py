"""Several models in one cluster, through real gateway and worker processes on a real Redis:
each served model has its own queue, capacity, line and figures, and one model's overload or
outage leaves the others alone."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest
import redis as sync_redis
from prometheus_client.parser import text_string_to_metric_families

from chatstream_cluster.shared.keys import Keys
from tests.cluster import wait_until
from tests.sse import CHAT, expected, stream

pytestmark = pytest.mark.slow


def chat(model: str, content: str, max_tokens: int, *, stream_: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "stream": stream_}


def worker_of(cluster, job_id: str) -> str:  # noqa: ANN001
    """The worker that ran a job, from its meta hash."""
    with sync_redis.Redis.from_url(cluster.redis_url) as r:
        return r.hget(Keys(cluster.key_prefix).job_meta(job_id), "worker").decode()


def model_gauges(gateway) -> dict[tuple[str, str], float]:  # noqa: ANN001
    """(metric, model) -> value of the per-model cluster gauges on /metrics."""
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    return {(s.name, s.labels["model"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if "model" in s.labels and s.labels.get("scope") == "cluster"}


def models_of(gateway) -> dict[str, dict[str, Any]]:  # noqa: ANN001
    status = httpx.get(gateway.url + "/admin/status", timeout=5).json()
    return {m["name"]: m for m in status["models"]}


class Holder(threading.Thread):
    """A long non-streaming request that keeps a permit of `model` busy."""

    def __init__(self, url: str, model: str, content: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, chat(model, content, max_tokens)
        self.status: int | None = None

    def run(self) -> None:
        self.status = httpx.post(self.url + CHAT, json=self.body, timeout=60).status_code


def test_two_models_serve_side_by_side_and_isolated(cluster) -> None:  # noqa: ANN001
    alpha = cluster.start_worker("mock", served_model_name="alpha", max_batch=1,
                                 mock_tokens_per_s=20, worker_ttl=1.0)
    beta = cluster.start_worker("mock", served_model_name="beta", max_batch=4)
    gateway = cluster.start_gateway(max_queue=1)
    cluster.wait_ready(gateway, workers=2)

    # /v1/models lists both; each request runs on a worker of its own model.
    listed = httpx.get(gateway.url + "/v1/models", timeout=5).json()["data"]
    assert sorted(m["id"] for m in listed) == ["alpha", "beta"]
    for model, worker in (("alpha", alpha), ("beta", beta)):
        resp = httpx.post(gateway.url + CHAT, json=chat(model, "which", 3), timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == model
        assert resp.json()["choices"][0]["message"]["content"] == expected("which", 3)
        assert worker_of(cluster, resp.headers["x-request-id"]) == worker.settings["worker_id"]
    unknown = httpx.post(gateway.url + CHAT, json=chat("gamma", "x", 3), timeout=10)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert "alpha, beta" in unknown.json()["error"]["message"]

    # alpha overloaded: one running (its cap: max_batch 1), one waiting (its line: max_queue 1),
    # the next refused. beta's line and cap are its own: it serves at once meanwhile.
    running = Holder(gateway.url, "alpha", "busy", 60)
    running.start()
    wait_until(lambda: models_of(gateway)["alpha"]["running"] == 1, 15, what="alpha running")
    waiting = Holder(gateway.url, "alpha", "queued", 3)
    waiting.start()
    wait_until(lambda: models_of(gateway)["alpha"]["queue_depth"] == 1, 15,
               what="alpha's line to hold one")
    refused = httpx.post(gateway.url + CHAT, json=chat("alpha", "no room", 3), timeout=10)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_requests"
    served = stream(gateway.url, chat("beta", "unaffected", 5, stream_=True))
    assert (served.finish, served.text, served.errors) == ("length", expected("unaffected", 5), [])

    # Per-model figures: status and metrics say which model waits.
    models = models_of(gateway)
    assert (models["alpha"]["running"], models["alpha"]["capacity"]) == (1, 1)
    assert (models["beta"]["queue_depth"], models["beta"]["capacity"]) == (0, 4)
    gauges = model_gauges(gateway)
    assert gauges[("chatstream_queue_depth", "alpha")] == 1
    assert gauges[("chatstream_queue_depth", "beta")] == 0
    assert gauges[("chatstream_running", "alpha")] == 1
    assert gauges[("chatstream_capacity", "beta")] == 4
    assert gauges[("chatstream_workers", "alpha")] == gauges[("chatstream_workers", "beta")] == 1
    running.join(60)
    waiting.join(60)
    assert (running.status, waiting.status) == (200, 200)

    # alpha's outage: beta serves on; alpha is known, so a request waits briefly and gets 503
    # no_worker (no --cold-start-timeout), not 404.
    alpha.kill()
    wait_until(lambda: models_of(gateway)["alpha"]["workers"] == 0, 10, what="alpha gone")

    def listed_models() -> list[str]:
        return [m["id"] for m in httpx.get(gateway.url + "/v1/models").json()["data"]]

    # /v1/models reads the gateway's view of the workers, refreshed in the background.
    wait_until(lambda: listed_models() == ["beta"], 10, what="/v1/models without alpha")
    down = httpx.post(gateway.url + CHAT, json=chat("alpha", "anyone?", 3), timeout=15)
    assert down.status_code == 503 and down.json()["error"]["code"] == "no_worker"
    assert httpx.post(gateway.url + CHAT, json=chat("beta", "still", 3),
                      timeout=15).status_code == 200


def test_chatstream_endpoints_use_the_default_model(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", served_model_name="alpha")
    beta = cluster.start_worker("mock", served_model_name="beta")
    undecided = cluster.start_gateway()
    chosen = cluster.start_gateway(default_model="beta")
    cluster.wait_ready(undecided, workers=2)
    cluster.wait_ready(chosen, workers=2)

    resp = httpx.post(undecided.url + "/chat_stream", json={"user_input": "hi"}, timeout=15)
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "default_model_unset"
    assert "--default-model" in resp.json()["message"]

    resp = httpx.post(chosen.url + "/chat_stream", json={"user_input": "hi"}, timeout=15)
    assert resp.status_code == 200 and resp.text.endswith("<::EOS::>")
    assert worker_of(cluster, resp.headers["x-request-id"]) == beta.settings["worker_id"]
