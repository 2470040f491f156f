"""Lost pub/sub messages are repaired from the job's stream; SSE clients resume by Last-Event-ID."""

from __future__ import annotations

import httpx
import orjson
import pytest
import redis as syncredis

from tests.cluster import wait_until
from tests.faults.test_worker_crash import StreamReader, expected

pytestmark = pytest.mark.slow


def test_dropped_pubsub_connection_is_repaired_from_the_job_stream(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", mock_tokens_per_s=60)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    reader = StreamReader(gateway.url, "drop my subscriber", 200)
    reader.start()
    assert reader.started_text.wait(15)
    admin = syncredis.Redis.from_url(cluster.redis_url)
    kills = 0
    try:
        while not reader.done.is_set() and kills < 5:
            # Drop every pub/sub connection: redis-py reconnects silently, losing what was
            # published meanwhile.
            kills += admin.client_kill_filter(_type="pubsub")
            reader.done.wait(0.3)
    finally:
        admin.close()
    assert kills >= 2
    assert reader.done.wait(30)
    assert reader.errors == []
    assert reader.text == expected("drop my subscriber", 200), "gap not repaired"
    assert reader.ids == sorted(reader.ids, key=lambda i: int(i.rsplit(":", 1)[1]))


def _read(resp: httpx.Response, stop_after: int | None = None) -> tuple[str, list[str], str]:
    text, ids, finish = "", [], ""
    for line in resp.iter_lines():
        if line.startswith("id: "):
            ids.append(line[4:])
        elif line.startswith("data: {"):
            data = orjson.loads(line[6:])
            assert "error" not in data, data
            for choice in data["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice.get("finish_reason") or finish
            if stop_after is not None and len(text.split()) >= stop_after:
                break
    return text, ids, finish


def test_sse_client_resumes_with_last_event_id_without_duplicates(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", mock_tokens_per_s=50)
    first_gw = cluster.start_gateway()
    second_gw = cluster.start_gateway()
    cluster.wait_ready(first_gw)
    body = {
        "model": "mock",
        "messages": [{"role": "user", "content": "resume me"}],
        "stream": True,
        "max_tokens": 80,
    }
    with httpx.stream("POST", first_gw.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        part1, ids, _ = _read(resp, stop_after=10)  # then the connection drops
    last_id = ids[-1]
    # Reconnect (to another gateway) once the first gateway has let the job go.
    wait_until(
        lambda: httpx.get(first_gw.url + "/admin/status").json()["running"] == 0,
        10,
        what="the first stream to be released",
    )
    with httpx.stream(
        "POST",
        second_gw.url + "/v1/chat/completions",
        json=body,
        headers={"Last-Event-ID": last_id},
        timeout=30,
    ) as resp:
        assert resp.status_code == 200
        part2, ids2, finish = _read(resp)
    assert finish == "length"
    assert part1 + part2 == expected("resume me", 80)
    assert all(int(i.rsplit(":", 1)[1]) > int(last_id.rsplit(":", 1)[1]) for i in ids2)


def test_bad_or_unknown_last_event_id(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock")
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    body = {"model": "mock", "messages": [{"role": "user", "content": "x"}], "stream": True}
    bad = httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers={"Last-Event-ID": "garbage"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
    unknown = httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers={"Last-Event-ID": "0" * 32 + ":3"}
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "stream_not_found"
