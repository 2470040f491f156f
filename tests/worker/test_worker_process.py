"""`chatstream worker --model PATH` as a real process: a model saved in a local folder serves
OpenAI requests through a gateway, and a prompt longer than its context is a 400.

The context check runs at the worker: only it has the model's tokenizer and chat template (the
gateway never imports worker code), so only it can count a prompt's tokens. It still answers
before anything is generated, and the gateway waits for a job's first event before it sends
response headers, so a stream gets a real HTTP 400 too, not a 200 with an error event.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.cluster import Cluster, Proc

pytestmark = pytest.mark.slow

CONTEXT = 2048  # the demo model's max_position_embeddings


@pytest.fixture(scope="module")
def local_model_cluster(
    redis_server, demo_model_dir: str, tmp_path_factory: pytest.TempPathFactory  # noqa: ANN001
) -> Iterator[tuple[Proc, str]]:
    """One worker serving the demo model from its folder (a path, not `demo`), one gateway."""
    cluster = Cluster(redis_server.url, "localmodel", tmp_path_factory.mktemp("procs"))
    try:
        cluster.start_worker(demo_model_dir, max_batch=4)
        gateway = cluster.start_gateway()
        cluster.wait_ready(gateway, timeout=120)
        yield gateway, demo_model_dir
    finally:
        cluster.stop()


def test_worker_loads_a_model_from_a_local_folder(local_model_cluster) -> None:  # noqa: ANN001
    gateway, path = local_model_cluster
    assert Path(path, "config.json").is_file() and Path(path, "tokenizer.json").is_file()
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [path]

    reply = client.chat.completions.create(
        model=path, messages=[{"role": "user", "content": "hello"}], max_tokens=12,
        temperature=0,
    )
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12 and len(text) == 12  # byte tokens, printable
    assert all(c.isprintable() or c == "\n" for c in text)

    stream = client.chat.completions.create(
        model=path, messages=[{"role": "user", "content": "hello"}], max_tokens=12,
        temperature=0, stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == text  # greedy: the same reply both ways


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_context_is_a_400_with_both_numbers(
    local_model_cluster, stream: bool  # noqa: ANN001
) -> None:
    gateway, path = local_model_cluster
    body = {
        "model": path,
        "messages": [{"role": "user", "content": "x" * 3000}],
        "max_tokens": 5,
        "stream": stream,
    }
    resp = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["code"] == "context_length_exceeded"
    # Byte-level demo tokenizer: the prompt is the content plus the chat template's tokens.
    prompt_tokens = int(error["message"].split()[2])
    assert 3000 < prompt_tokens < 3100
    assert error["message"] == (
        f"prompt is {prompt_tokens} tokens but the model's context is {CONTEXT} tokens"
    )
    # The worker is unharmed: the next request is served.
    ok = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={**body, "messages": [{"role": "user", "content": "short"}]},
        timeout=60,
    )
    assert ok.status_code == 200


def test_a_model_the_engine_cannot_serve_is_refused_at_start(cluster, demo_model_dir) -> None:  # noqa: ANN001
    worker = cluster.start_worker(demo_model_dir, max_model_len=99999)
    assert worker.wait(120) == 2
    assert "cannot serve this model" in worker.log()
    assert "longer than the model's context (2048)" in worker.log()


def test_kv_use_and_requests_waiting_inside_the_worker_are_reported(
    cluster, demo_model_dir: str  # noqa: ANN001
) -> None:
    """Two streams reserve the whole KV cache (prompt + max_tokens each); a third waits inside
    the worker: /admin/status and /metrics say so, per worker."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.cluster import wait_until
    from tests.faults.test_worker_crash import StreamReader

    token_bytes = 4 * 2 * 256 * 4  # the demo model's keys and values per token
    worker = cluster.start_worker(demo_model_dir, max_batch=4, kv_cache_memory=680 * token_bytes)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway, timeout=120)
    readers = [StreamReader(gateway.url, f"kv {i}", 300) for i in range(3)]
    for r in readers:
        r.body_extra = {"model": demo_model_dir}
        r.start()
    wid = worker.settings["worker_id"]

    def full() -> dict | None:
        status = httpx.get(gateway.url + "/admin/status", timeout=5).json()
        w = next((w for w in status["workers"] if w["id"] == wid), None)
        if w and w["waiting"] == 1 and w["kv_tokens_used"] == w["kv_tokens_total"] == 672:
            return status
        return None

    status = wait_until(full, 60, interval=0.1, what="a full KV cache and a waiting request")
    assert status["waiting_in_workers"] == 1
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert ("chatstream_kv_cache_usage_ratio", (("worker", wid),)) in samples
    model = worker.settings["model"]
    assert samples[("chatstream_waiting_in_workers", (("model", model), ("scope", "cluster")))] == 1
    for r in readers:
        assert r.done.wait(120)
        assert r.errors == [] and r.finish == "length"
