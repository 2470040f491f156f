"""ChatStream's wire protocol through real processes: gateways + Redis + mock workers.

The client below behaves like ChatStream's browser client: it posts `{"user_input",
"regenerate"}`, keeps the `sid` cookie and splits the text stream on `<::EOS::>`.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from urllib.parse import unquote

import httpx
import orjson
import pytest
import redis as sync_redis

from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.schemas import ChatMessage
from chatstream_cluster.worker.mock_engine import mock_reply, render_prompt

EOS = "<::EOS::>"
N_TOKENS = 12


@dataclass
class Reply:
    text: str
    chunks: list[str]
    message_id: str
    headers: httpx.Headers


def chat(client: httpx.Client, url: str, user_input: str | None = None,
         regenerate: bool = False) -> Reply:
    """One turn the way ChatStream's client reads it."""
    body = {"user_input": user_input, "regenerate": regenerate}
    with client.stream("POST", url + "/chat_stream", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        buffer, chunks = "", []
        for piece in resp.iter_text():
            buffer += piece
            *done, buffer = buffer.split(EOS)
            chunks += done
    assert buffer == "", "the stream must end with <::EOS::>"
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert after.startswith(before), "each chunk is the whole reply so far"
    return Reply(chunks[-1] if chunks else "", chunks,
                 resp.headers["x-chatstream-last-generated-message-id"], resp.headers)


def expected(*contents: str, n: int = N_TOKENS) -> str:
    """The mock's reply to a conversation given as alternating user/assistant contents."""
    roles = ["user", "assistant"]
    messages = [ChatMessage(role=roles[i % 2], content=c) for i, c in enumerate(contents)]
    return mock_reply(render_prompt(messages), n)


def prompt_of(client: httpx.Client, url: str) -> str | None:
    body = client.get(url + "/get_prompt").json()
    assert body["success"] is True
    return None if body["prompt"] is None else unquote(body["prompt"])


@pytest.fixture
def two_gateways(cluster):  # noqa: ANN001, ANN201
    cluster.start_worker("mock", mock_tokens_per_s=200)
    a = cluster.start_gateway(default_max_tokens=N_TOKENS)
    b = cluster.start_gateway(default_max_tokens=N_TOKENS)
    cluster.wait_ready(a)
    cluster.wait_ready(b)
    return a, b


def test_history_follows_the_session_across_gateways_and_a_restart(
    cluster, two_gateways  # noqa: ANN001
) -> None:
    a, b = two_gateways
    with httpx.Client(timeout=30) as client:
        r1 = chat(client, a.url, "hello")
        assert r1.headers["content-type"] == "text/plain; charset=utf-8"
        assert len(r1.chunks) >= 2
        assert r1.text == expected("hello")
        r2 = chat(client, b.url, "how are you")  # the other gateway, same cookie
        assert r2.text == expected("hello", r1.text, "how are you")
        a.terminate()
        assert a.wait(15) == 0
        a2 = cluster.start_gateway(default_max_tokens=N_TOKENS)
        r3 = chat(client, a2.url, "bye")
        assert r3.text == expected("hello", r1.text, "how are you", r2.text, "bye")
        history = ["hello", r1.text, "how are you", r2.text, "bye"]
        roles = ["user", "assistant"]
        rendered = render_prompt([ChatMessage(role=roles[i % 2], content=c)
                                  for i, c in enumerate(history)])
        assert prompt_of(client, b.url) == rendered + r3.text
        ids = {r1.message_id, r2.message_id, r3.message_id}
        assert len(ids) == 3 and all(uuid.UUID(i) for i in ids)


def test_cookie_is_signed_httponly_lax_and_secure_when_configured(cluster, two_gateways) -> None:  # noqa: ANN001
    a, _ = two_gateways
    with httpx.Client(timeout=30) as client:
        reply = chat(client, a.url, "hi")
        cookie = reply.headers["set-cookie"]
        assert re.match(r"sid=[0-9a-f]{32}\.[0-9a-f]{64};", cookie)
        attrs = cookie.lower()
        assert "httponly" in attrs and "samesite=lax" in attrs and "path=/" in attrs
        assert "max-age=" in attrs and "secure" not in attrs
        sid = client.cookies["sid"]
        assert prompt_of(client, a.url) is not None

        tampered = sid[:-1] + ("0" if sid[-1] != "0" else "1")
        for bad in (tampered, "0" * 32 + sid[32:], "nonsense", "../" + sid):
            with httpx.Client(timeout=30) as other:
                other.cookies.set("sid", bad, domain="127.0.0.1", path="/")
                assert prompt_of(other, a.url) is None  # a fresh session, not an error
                assert other.cookies["sid"] != bad
                assert chat(other, a.url, "hi").text == expected("hi")
    secure = cluster.start_gateway(cookie_secure=True)
    resp = httpx.get(secure.url + "/get_prompt")
    assert resp.status_code == 200
    assert "secure" in resp.headers["set-cookie"].lower()


def test_regenerate_replaces_the_last_reply(two_gateways) -> None:  # noqa: ANN001
    a, b = two_gateways
    with httpx.Client(timeout=30) as client:
        resp = client.post(a.url + "/chat_stream", json={"user_input": "", "regenerate": True})
        assert resp.status_code == 400
        body = resp.json()
        assert body["success"] is False and "nothing to regenerate" in body["message"]
        assert body["error"]["param"] == "regenerate"

        first = chat(client, a.url, "hi")
        again = chat(client, b.url, regenerate=True)
        # The worker saw the history without the old reply, so the mock answers the same text.
        assert again.text == first.text == expected("hi")
        assert again.message_id != first.message_id
        assert prompt_of(client, a.url) == render_prompt(
            [ChatMessage(role="user", content="hi")]) + again.text
        after = chat(client, a.url, "next")
        assert after.text == expected("hi", again.text, "next")


def test_clear_context_starts_over(two_gateways) -> None:  # noqa: ANN001
    a, b = two_gateways
    with httpx.Client(timeout=30) as client:
        chat(client, a.url, "remember this")
        resp = client.post(b.url + "/clear_context")
        assert resp.json() == {"success": True, "message": "Context successfully cleared"}
        assert prompt_of(client, a.url) is None
        assert chat(client, a.url, "hi").text == expected("hi")


def test_generation_params_are_per_session_and_validated(two_gateways) -> None:  # noqa: ANN001
    a, b = two_gateways
    defaults = {"temperature": 1.0, "top_k_value": 50, "top_p_value": 1.0}
    with httpx.Client(timeout=30) as client, httpx.Client(timeout=30) as stranger:
        assert client.get(a.url + "/get_generation_params").json()["generation_params"] == defaults
        resp = client.post(a.url + "/set_generation_params",
                           json={"temperature": 0.3, "top_k_value": 5})
        merged = {"temperature": 0.3, "top_k_value": 5, "top_p_value": 1.0}
        assert resp.json() == {"success": True, "message": "success", "generation_params": merged}
        assert client.get(b.url + "/get_generation_params").json()["generation_params"] == merged
        assert stranger.get(b.url + "/get_generation_params").json()["generation_params"] == (
            defaults)
        client.post(a.url + "/set_generation_params", json={"top_k_value": None})
        assert client.get(b.url + "/get_generation_params").json()["generation_params"] == {
            **merged, "top_k_value": 50}
        assert chat(client, a.url, "hi").text == expected("hi")  # turns use them

        for body, field in [({"temperature": 1.5}, "temperature"),
                            ({"top_k_value": 0}, "top_k_value"),
                            ({"top_k_value": 501}, "top_k_value"),
                            ({"top_p_value": -0.1}, "top_p_value"),
                            ({"temperature": "hot"}, "temperature"),
                            ({"top_k": 5}, "top_k")]:
            resp = client.post(a.url + "/set_generation_params", json=body)
            assert resp.status_code == 400, body
            error = resp.json()
            assert error["success"] is False and field in error["message"]
            assert error["error"]["param"] == field
        assert client.get(a.url + "/get_generation_params").json()["generation_params"] == {
            **merged, "top_k_value": 50}


def test_feedback_lands_in_the_redis_stream(two_gateways, redis_url, key_prefix) -> None:  # noqa: ANN001
    a, b = two_gateways
    with httpx.Client(timeout=30) as client:
        reply = chat(client, a.url, "rate me")
        later = chat(client, a.url, "and now?")  # feedback may name any reply still in history
        resp = client.post(b.url + "/set_feedback", json={
            "is_like": True, "message_id": reply.message_id, "form_data": {"comment": "good"}})
        assert resp.json() == {"success": True, "message": "success"}
        resp = client.post(b.url + "/set_feedback",
                           json={"is_like": False, "message_id": later.message_id})
        assert resp.json() == {"success": True, "message": "success"}
        missing = client.post(a.url + "/set_feedback",
                              json={"is_like": False, "message_id": "no-such-id"})
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "message_id"
        bad = client.post(a.url + "/set_feedback",
                          json={"is_like": "yes", "message_id": reply.message_id})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "is_like"
    r = sync_redis.Redis.from_url(redis_url)
    try:
        entries = r.xrange(Keys(key_prefix).feedback)
    finally:
        r.close()
    assert len(entries) == 2
    data = orjson.loads(entries[0][1][b"data"])
    assert data["message_id"] == reply.message_id and data["is_like"] is True
    assert data["message"] == reply.text
    assert data["messages"] == [{"role": "user", "content": "rate me"},
                                {"role": "assistant", "content": reply.text}]
    assert data["form_data"] == {"comment": "good"}
    assert data["params"]["top_k_value"] == 50
    second = orjson.loads(entries[1][1][b"data"])
    assert second["is_like"] is False and second["message"] == later.text
    assert [m["content"] for m in second["messages"]] == [
        "rate me", reply.text, "and now?", later.text]


def test_a_second_turn_of_a_busy_session_gets_409(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", mock_tokens_per_s=50)
    gw = cluster.start_gateway(default_max_tokens=40)
    cluster.wait_ready(gw)
    with httpx.Client(timeout=30) as client:
        chat(client, gw.url, "first")  # now the client has a session cookie
        first_reply = expected("first", n=40)
        with client.stream("POST", gw.url + "/chat_stream", json={"user_input": "second"}) as run:
            assert run.status_code == 200
            pieces = run.iter_text()
            next(pieces)  # streaming: the turn holds the session
            busy = client.post(gw.url + "/chat_stream", json={"user_input": "third"})
            assert busy.status_code == 409
            body = busy.json()
            assert body["error"]["code"] == "session_busy" and "already generating" in (
                body["message"])
            assert busy.headers["retry-after"] == "1"
            with httpx.Client(timeout=30) as other:  # another session is not blocked
                assert chat(other, gw.url, "x").text == expected("x", n=40)
            for _ in pieces:
                pass
        # The refused turn left no trace; the next one continues the history.
        third = chat(client, gw.url, "third")
        second_reply = expected("first", first_reply, "second", n=40)
        assert third.text == expected("first", first_reply, "second", second_reply, "third", n=40)


async def test_get_load_and_resource_usage_cover_every_worker(cluster) -> None:  # noqa: ANN001
    workers = [cluster.start_worker("mock", mock_tokens_per_s=20) for _ in range(2)]
    gw = cluster.start_gateway(max_concurrent=1, max_queue=7, default_max_tokens=400)
    cluster.wait_ready(gw, workers=2)
    names = {w.settings["worker_id"] for w in workers}

    async def stream(client: httpx.AsyncClient, text: str) -> None:
        async with client.stream("POST", gw.url + "/chat_stream", json={"user_input": text}) as r:
            async for _ in r.aiter_text():
                pass

    clients = [httpx.AsyncClient(timeout=60) for _ in range(3)]
    tasks = [asyncio.create_task(stream(c, f"user {i}")) for i, c in enumerate(clients)]
    try:
        async with httpx.AsyncClient(timeout=10) as probe:
            async def loaded() -> dict | None:
                body = (await probe.get(gw.url + "/get_load")).json()
                entries = body["chatstream_workers"]
                busy = sum(e["processing"] for e in entries)
                if body["cluster"]["waiting"] == 2 and busy == 1:
                    return body
                return None

            body = await _poll(loaded, 15)
            entries = body["chatstream_workers"]
            assert {e["name"] for e in entries} == names
            assert sum(e["waiting"] for e in entries) == 2
            assert all(e["max_processing"] == 16 and e["max_waiting"] == 7 for e in entries)
            assert body["cluster"] == {"processing": 1, "waiting": 2, "max_processing": 1,
                                       "max_waiting": 7, "workers": 2}
            usage = (await probe.get(gw.url + "/get_resource_usage")).json()
            assert usage["success"] is True
            assert {u["name"] for u in usage["memory_usage"]} == names
            for u in usage["memory_usage"]:
                assert u["num_gpus"] == len(u["gpus"]) == 0
                assert u["cpu"]["total_memory"] > 0 and u["cpu"]["used_memory"] > 0
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.aclose()


async def _poll(check, within: float):  # noqa: ANN001, ANN202
    """Await `check()` until it returns something truthy (TimeoutError after `within` s)."""
    async with asyncio.timeout(within):
        while True:
            if value := await check():
                return value
            await asyncio.sleep(0.05)


def test_bad_chat_stream_bodies_are_400(two_gateways) -> None:  # noqa: ANN001
    a, _ = two_gateways
    for content, param in [(b'{"user_input": ', None), (b"[1, 2]", None),
                           (b'{"regenerate": false}', "user_input"),
                           (b'{"user_input": 5}', "user_input")]:
        resp = httpx.post(a.url + "/chat_stream", content=content,
                          headers={"content-type": "application/json"})
        assert resp.status_code == 400, content
        assert resp.json()["success"] is False
        assert resp.json()["error"]["param"] == param
