"""The OpenAI-compatible API through real processes: gateway + Redis + mock worker."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from chatstream_cluster.shared.schemas import ChatMessage
from chatstream_cluster.worker.mock_engine import mock_reply, render_prompt


@pytest.fixture
def mock_cluster(cluster):  # noqa: ANN001, ANN201
    worker = cluster.start_worker("mock", mock_tokens_per_s=200)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    return gateway, worker


def expected_text(content: str, n: int) -> str:
    return mock_reply(render_prompt([ChatMessage(role="user", content=content)]), n)


def test_openai_sdk_streams_deltas_finish_reason_and_usage(mock_cluster) -> None:  # noqa: ANN001
    gateway, _ = mock_cluster
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="mock",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        max_tokens=20,
        stream_options={"include_usage": True},
    )
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert len(deltas) >= 2, deltas
    assert "".join(deltas) == expected_text("hello", 20)
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 20
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + 20


def test_openai_sdk_non_stream_and_models(mock_cluster) -> None:  # noqa: ANN001
    gateway, _ = mock_cluster
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=7
    )
    assert reply.choices[0].message.content == expected_text("hi", 7)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7
    assert [m.id for m in client.models.list()] == ["mock"]


def test_stop_string_ends_the_reply(mock_cluster) -> None:  # noqa: ANN001
    gateway, _ = mock_cluster
    full = expected_text("stop me", 30)
    stop_word = full.split()[5]
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="mock",
        messages=[{"role": "user", "content": "stop me"}],
        max_tokens=30,
        stop=[stop_word],
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == full[: full.index(stop_word)]


async def _stream_text(client: httpx.AsyncClient, content: str, n: int) -> tuple[str, list[int]]:
    text, seqs = "", []
    body = {
        "model": "mock",
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "max_tokens": n,
    }
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("id: "):
                seqs.append(int(line.rsplit(":", 1)[1]))
            if line.startswith("data: {"):
                import orjson

                chunk = orjson.loads(line[6:])
                for choice in chunk.get("choices", []):
                    text += choice["delta"].get("content") or ""
    return text, seqs


async def test_concurrent_streams_get_only_their_own_tokens_in_order(mock_cluster) -> None:  # noqa: ANN001
    gateway, _ = mock_cluster
    prompts = [f"user number {i}" for i in range(6)]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        results = await asyncio.gather(*(_stream_text(client, p, 40) for p in prompts))
    for prompt, (text, seqs) in zip(prompts, results, strict=True):
        assert text == expected_text(prompt, 40)
        assert seqs == sorted(seqs), "events relayed out of sequence order"
    assert len({text for text, _ in results}) == len(prompts)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (
            {"model": "mock", "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "messages[0].role",
        ),
        ({"model": "mock", "messages": []}, 400, "messages"),
        (
            {"model": "mock", "messages": [{"role": "user", "content": "x"}], "temperature": 5},
            400,
            "temperature",
        ),
        (
            {"model": "mock", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            400,
            "max_tokens",
        ),
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ],
)
def test_bad_requests_get_openai_style_errors(mock_cluster, body, status, param) -> None:  # noqa: ANN001
    gateway, _ = mock_cluster
    resp = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param
    assert error["message"]


def test_malformed_json_is_400(mock_cluster) -> None:  # noqa: ANN001
    gateway, _ = mock_cluster
    resp = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=b'{"model": ',
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_json"


def test_health_and_readiness(mock_cluster) -> None:  # noqa: ANN001
    gateway, _ = mock_cluster
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] == 1


def test_no_live_worker_is_a_fast_503(cluster) -> None:  # noqa: ANN001
    gateway = cluster.start_gateway(no_worker_timeout=1.0)
    assert httpx.get(gateway.url + "/readyz").status_code == 503
    resp = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "mock", "messages": [{"role": "user", "content": "x"}]},
        timeout=10,
    )
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "no_worker"
    assert resp.elapsed.total_seconds() < 5
