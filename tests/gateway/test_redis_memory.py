"""What clients can make the cluster store in Redis is bounded, against real processes.

Floods of feedback and of sessions are refused or trimmed past their caps, with Redis's memory
measured before and after; every key the cluster writes either expires or is bounded; the
embedded Redis runs with a maxmemory whose policy never evicts a key; `/metrics` shows Redis's
memory.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as syncredis

from chatstream_cluster.gateway.sessions.history import HISTORY_CHAR_BUDGET
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.redis_server import RedisServer
from tests.cluster import mock_gateway

MAX_SESSIONS = 20
MAX_FEEDBACK = 50
SETTINGS = {"max_sessions_per_key": MAX_SESSIONS, "feedback_max_entries": MAX_FEEDBACK,
            "feedback_retention": 3600, "default_max_tokens": 8}
MB = 1 << 20


@pytest.fixture(scope="module")
def env(redis_server, tmp_path_factory) -> Iterator[tuple[str, syncredis.Redis, Keys]]:  # noqa: ANN001
    """(gateway URL, a Redis client, the keys) of a gateway with small caps."""
    client = syncredis.Redis.from_url(redis_server.url)
    try:
        with mock_gateway(redis_server.url, tmp_path_factory.mktemp("redis-memory"),
                          **SETTINGS) as gw:
            yield gw.url, client, Keys(gw.settings["key_prefix"])
    finally:
        client.close()


def used_memory(client: syncredis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def session_keys(client: syncredis.Redis, keys: Keys) -> list[bytes]:
    return [k for k in client.scan_iter(f"{keys.prefix}:session:*", count=1000)
            if not k.endswith(b":lock")]


@contextlib.contextmanager
def a_reply(url: str) -> Iterator[tuple[httpx.Client, str]]:
    """A client with a session holding one reply, and the reply's message id."""
    with httpx.Client(base_url=url, timeout=10) as client:
        resp = client.post("/chat_stream", json={"user_input": "rate me"})
        assert resp.status_code == 200, resp.text
        yield client, resp.headers["x-chatstream-last-generated-message-id"]


def nested(depth: int) -> str:
    """form_data `depth` levels deep (the object itself is level 1), as JSON text (Python's
    and orjson's encoders both refuse to go this deep)."""
    return '{"deep": ' + "[" * (depth - 1) + "1" + "]" * (depth - 1) + "}"


# --- feedback -----------------------------------------------------------------------------------
def test_feedback_form_data_depth_and_size_are_capped(env) -> None:  # noqa: ANN001
    url, _, _ = env
    with a_reply(url) as (client, reply):
        def feedback(form: dict | str) -> httpx.Response:
            form_json = form if isinstance(form, str) else json.dumps(form)
            body = f'{{"is_like": true, "message_id": "{reply}", "form_data": {form_json}}}'
            return client.post("/set_feedback", content=body,
                               headers={"content-type": "application/json"})

        for depth in (17, 253, 300, 1000):  # orjson itself gives up at 255 when encoding
            resp = feedback(nested(depth))
            assert resp.status_code == 400, (depth, resp.text)
            assert resp.json()["error"]["code"] == "form_data_too_deep"
        assert feedback(nested(16)).status_code == 200
        big = feedback({"text": "x" * (65 * 1024)})
        assert big.status_code == 413 and big.json()["error"]["code"] == "form_data_too_large"
        assert feedback({"text": "x" * (60 * 1024)}).status_code == 200


def test_a_feedback_flood_keeps_the_stream_bounded(env) -> None:  # noqa: ANN001
    url, redis, keys = env
    before = used_memory(redis)
    started = time.monotonic()
    with a_reply(url) as (client, reply):
        for i in range(300):
            resp = client.post("/set_feedback", json={
                "is_like": bool(i % 2), "message_id": reply,
                "form_data": {"comment": f"{i} " + "y" * 60_000}})
            assert resp.status_code == 200, resp.text
    took = time.monotonic() - started
    length = redis.xlen(keys.feedback)
    grown = used_memory(redis) - before
    print(f"\n300 x 60 KB feedback in {took:.1f}s: stream holds {length} entries, Redis "
          f"+{grown / MB:.1f} MB (cap {MAX_FEEDBACK} entries)")
    assert length <= MAX_FEEDBACK + 100  # MAXLEN ~ trims whole stream nodes
    assert grown < (MAX_FEEDBACK + 100) * 70 * 1024


def test_feedback_older_than_the_retention_is_trimmed(env) -> None:  # noqa: ANN001
    url, redis, keys = env
    redis.delete(keys.feedback)
    old = redis.xadd(keys.feedback, {"data": b"{}"}, id="1000-0")  # from 1970
    assert redis.xrange(keys.feedback, min=old, max=old)
    with a_reply(url) as (client, reply):
        resp = client.post("/set_feedback", json={"is_like": True, "message_id": reply})
        assert resp.status_code == 200
    assert redis.xrange(keys.feedback, min=old, max=old) == []
    oldest = redis.xrange(keys.feedback, count=1)[0][0].decode()
    assert int(oldest.split("-")[0]) >= (time.time() - SETTINGS["feedback_retention"]) * 1000


# --- sessions -----------------------------------------------------------------------------------
def test_turns_over_the_history_budget_are_refused_and_store_nothing(env) -> None:  # noqa: ANN001
    url, redis, keys = env
    sessions_before = len(session_keys(redis, keys))
    before = used_memory(redis)
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(200):
            client.cookies.clear()  # cookie-less: a new session each time
            resp = client.post("/chat_stream", json={"user_input": "z" * 99_000})
            assert resp.status_code == 400
            assert resp.json()["error"]["code"] == "message_too_long"
    grown = used_memory(redis) - before
    print(f"\n200 cookie-less turns of 99,000 chars: refused, Redis {grown / 1024:+.0f} KiB")
    assert len(session_keys(redis, keys)) == sessions_before
    assert grown < MB


def test_sessions_per_key_are_capped_least_recently_used_first(env) -> None:  # noqa: ANN001
    url, redis, keys = env
    text = "w" * (HISTORY_CHAR_BUDGET - 1000)  # near the budget: about the largest session
    before = used_memory(redis)
    cookies = []
    with httpx.Client(base_url=url, timeout=20) as client:
        for _ in range(3 * MAX_SESSIONS):
            client.cookies.clear()
            resp = client.post("/chat_stream", json={"user_input": text})
            assert resp.status_code == 200, resp.text
            cookies.append(resp.cookies["sid"])
        stored = session_keys(redis, keys)
        sizes = [redis.memory_usage(k, samples=0) or 0 for k in stored]
        grown = used_memory(redis) - before
        print(f"\n{3 * MAX_SESSIONS} cookie-less turns of {len(text):,} chars: {len(stored)} "
              f"sessions kept (cap {MAX_SESSIONS}), each {min(sizes) / 1024:.0f}-"
              f"{max(sizes) / 1024:.0f} KiB, Redis +{grown / MB:.1f} MB")
        assert len(stored) <= MAX_SESSIONS
        # One session holds its history and its prompt, each about the budget plus a reply.
        assert max(sizes) < 2 * HISTORY_CHAR_BUDGET + 16 * 1024
        # The oldest sessions were the ones let go: their cookies find nothing any more; the
        # newest are whole.
        for cookie, kept in ((cookies[0], False), (cookies[-1], True)):
            client.cookies.clear()
            client.cookies["sid"] = cookie
            assert (client.get("/get_prompt").json()["prompt"] is not None) is kept
        for _ in range(MAX_SESSIONS):  # sessions made by the other writes count the same
            client.cookies.clear()
            assert client.post("/clear_context").status_code == 200
            client.cookies.clear()
            assert client.post("/set_generation_params",
                               json={"temperature": 0.1}).status_code == 200
        assert len(session_keys(redis, keys)) <= MAX_SESSIONS
        assert redis.zcard(keys.session_index("anon")) <= MAX_SESSIONS


# --- every key --------------------------------------------------------------------------------
#: Keys without a TTL, each bounded another way: the semaphore and the registries by the
#: members they purge, each served model's job stream (`model:<tag>:jobs`) by its consumers,
#: the models hash by the day after which a model no worker served is dropped, the dead
#: letters by MAXLEN, the feedback by MAXLEN and MINID, the session indexes by
#: --max-sessions-per-key.
UNEXPIRING = ("sem:", "model:", "models", "jobs:", "workers", "gateways", "feedback",
              "sessions:")
#: Keys that expire: sessions and their locks, job meta and events, registry entries, the ops
#: page's per-minute stats buckets.
EXPIRING = ("session:", "job:", "worker:", "gateway:", "stats:")


def test_every_key_the_cluster_writes_expires_or_is_bounded(env) -> None:  # noqa: ANN001
    url, redis, keys = env
    with a_reply(url) as (client, reply):
        client.post("/set_feedback", json={"is_like": True, "message_id": reply})
        done = client.post("/v1/chat/completions", json={
            "model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert done.status_code == 200
    seen = set()
    for key in redis.scan_iter(f"{keys.prefix}:*", count=1000):
        name = key.decode()[len(keys.prefix) + 1:]
        ttl = redis.pttl(key)
        if name.startswith(EXPIRING):
            assert ttl > 0, name
            seen.add(name.split(":")[0])
        else:
            assert name.startswith(UNEXPIRING), f"unknown key {name!r}"
            assert ttl == -1, name
    assert {"session", "job", "worker", "gateway"} <= seen


def test_metrics_show_redis_memory(env) -> None:  # noqa: ANN001
    url, redis, _ = env
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    used = [line for line in lines if line.startswith('chatstream_redis_used_memory_bytes{')]
    assert used and float(used[0].split()[-1]) > 0
    assert any(line.startswith('chatstream_redis_maxmemory_bytes{') for line in lines)


def test_the_embedded_redis_never_evicts_past_its_maxmemory(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=False, maxmemory="8mb").start()
    client = syncredis.Redis.from_url(server.url)
    try:
        config = client.config_get("maxmemory*")
        assert config["maxmemory"] == str(8 * MB)
        assert config["maxmemory-policy"] == "noeviction"
        written = 0
        with pytest.raises(syncredis.exceptions.ResponseError, match="maxmemory"):
            for written in range(1000):  # noqa: B007 - how many got in is checked below
                client.set(f"k{written}", b"v" * 100_000, px=60_000)  # with a TTL: evictable
        assert written > 10
        assert all(client.exists(f"k{i}") for i in range(written))  # none was evicted
    finally:
        client.close()
        server.stop()
