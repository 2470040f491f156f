"""Worker death and client disconnects, with real processes, SIGKILL and SIGSTOP."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import orjson
import pytest
import redis as syncredis
import redis.asyncio as aioredis

from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.schemas import ChatMessage, TokenEvent
from chatstream_cluster.shared.semaphore import RedisSemaphore
from chatstream_cluster.worker.mock_engine import mock_reply, render_prompt
from tests.cluster import wait_until

pytestmark = pytest.mark.slow

FAST_TAKEOVER = {"job_claim_idle": 1.0, "worker_ttl": 1.0, "mock_tokens_per_s": 40}


def expected(content: str, n: int) -> str:
    return mock_reply(render_prompt([ChatMessage(role="user", content=content)]), n)


class StreamReader(threading.Thread):
    """Reads one SSE stream in the background; records text, errors and event ids."""

    def __init__(self, url: str, content: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.content, self.max_tokens = url, content, max_tokens
        self.text = ""
        self.errors: list[dict] = []
        self.finish: str | None = None
        self.ids: list[str] = []
        self.status = 0
        self.done = threading.Event()
        self.started_text = threading.Event()
        self.body_extra: dict = {}  # fields to add to the request (e.g. another model)

    def run(self) -> None:
        body = {
            "model": "mock",
            "messages": [{"role": "user", "content": self.content}],
            "stream": True,
            "max_tokens": self.max_tokens,
            **self.body_extra,
        }
        try:
            with httpx.stream(
                "POST", self.url + "/v1/chat/completions", json=body, timeout=60
            ) as resp:
                self.status = resp.status_code
                if resp.status_code != 200:
                    self.errors.append(
                        {
                            "code": str(resp.status_code),
                            "message": resp.read().decode(errors="replace"),
                        }
                    )
                for line in resp.iter_lines():
                    if line.startswith("id: "):
                        self.ids.append(line[4:])
                    if not line.startswith("data: {"):
                        continue
                    data = orjson.loads(line[6:])
                    if "error" in data:
                        self.errors.append(data["error"])
                    for choice in data.get("choices", []):
                        self.text += choice["delta"].get("content") or ""
                        if self.text:
                            self.started_text.set()
                        self.finish = choice.get("finish_reason") or self.finish
        except httpx.HTTPError as exc:
            self.errors.append({"code": "transport", "message": str(exc)})
        finally:
            self.done.set()


def job_owner(redis_url: str, prefix: str) -> dict[str, str]:
    """job id -> worker id of every running job."""
    client = syncredis.Redis.from_url(redis_url)
    try:
        owners = {}
        for key in client.scan_iter(f"{prefix}:job:*:meta"):
            meta = client.hgetall(key)
            if meta.get(b"status") == b"running":
                owners[key.decode().split("{")[1].split("}")[0]] = meta[b"worker"].decode()
        return owners
    finally:
        client.close()


def sem_counts(redis_url: str, prefix: str) -> tuple[int, int]:
    """(held, waiting) of the cluster semaphore, expired leases purged."""

    async def counts() -> tuple[int, int]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await RedisSemaphore(client, Keys(prefix), Keys.model_semaphore("mock")).counts()
        finally:
            await client.aclose()

    return asyncio.run(counts())


def last_event(redis_url: str, prefix: str, job_id: str) -> TokenEvent | None:
    client = syncredis.Redis.from_url(redis_url)
    try:
        entries = client.xrevrange(Keys(prefix).job_events(job_id), count=1)
        return TokenEvent.unpack(entries[0][1][b"e"]) if entries else None
    finally:
        client.close()


def park_event(redis_url: str, prefix: str, job_id: str, within: float) -> TokenEvent:
    """Wait for the event a worker stores when it stops a job unfinished (parked, resumable)."""

    def parked() -> TokenEvent | None:
        event = last_event(redis_url, prefix, job_id)
        return event if event is not None and event.parked else None

    return wait_until(parked, within, what=f"the park event of job {job_id}")


def test_killed_worker_streams_continue_on_survivor_exactly(cluster) -> None:  # noqa: ANN001
    a = cluster.start_worker("mock", **FAST_TAKEOVER)
    b = cluster.start_worker("mock", **FAST_TAKEOVER)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway, workers=2)
    readers = [StreamReader(gateway.url, f"crash test {i}", 120) for i in range(4)]
    for r in readers:
        r.start()
    for r in readers:
        assert r.started_text.wait(15)
    owners = wait_until(lambda: job_owner(cluster.redis_url, cluster.key_prefix), 5)
    victim = a if a.settings["worker_id"] in owners.values() else b
    victim.kill()
    for r in readers:
        assert r.done.wait(40), "stream did not finish after the worker died"
        assert r.errors == []
        assert r.finish == "length"
        assert r.text == expected(r.content, 120), "text repeated or lost across the takeover"
    survivor = b if victim is a else a

    def true_values() -> bool:
        status = httpx.get(gateway.url + "/admin/status", timeout=5).json()
        return (
            status["queue_depth"] == 0
            and status["running"] == 0
            and [w["id"] for w in status["workers"]] == [survivor.settings["worker_id"]]
            and status["workers"][0]["running"] == 0
        )

    wait_until(true_values, 10, interval=0.2, what="permits, queue depth and workers to settle")
    assert sem_counts(cluster.redis_url, cluster.key_prefix) == (0, 0)
    # The dead worker's consumer leaves the group once its jobs are claimed.
    wait_until(lambda: consumers(cluster) == [survivor.settings["worker_id"]], 15,
               interval=0.2, what="the dead worker's consumer to be removed")


def consumers(cluster) -> list[str]:  # noqa: ANN001
    client = syncredis.Redis.from_url(cluster.redis_url)
    try:
        rows = client.xinfo_consumers(Keys(cluster.key_prefix).job_stream("mock"), "workers")
        return sorted(row["name"].decode() for row in rows)
    finally:
        client.close()


def test_paused_worker_late_writes_are_fenced(cluster) -> None:  # noqa: ANN001
    a = cluster.start_worker("mock", **FAST_TAKEOVER)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway, workers=1)
    reader = StreamReader(gateway.url, "fence test", 150)
    reader.start()
    assert reader.started_text.wait(15)
    os.kill(a.pid, signal.SIGSTOP)  # alive but silent: its job is taken over
    try:
        b = cluster.start_worker("mock", **FAST_TAKEOVER)
        wait_until(
            lambda: (
                b.settings["worker_id"] in job_owner(cluster.redis_url, cluster.key_prefix).values()
            ),
            20,
            what="takeover",
        )
    finally:
        os.kill(a.pid, signal.SIGCONT)  # its stale attempt now tries to write
    assert reader.done.wait(40)
    assert reader.errors == []
    assert reader.text == expected("fence test", 150)
    wait_until(lambda: "taken over by another worker" in a.log(), 10, what="fenced log line")


def test_queued_jobs_are_served_by_survivors(cluster) -> None:  # noqa: ANN001
    a = cluster.start_worker("mock", max_batch=1, **FAST_TAKEOVER)
    gateway = cluster.start_gateway(max_concurrent=4)
    cluster.wait_ready(gateway, workers=1)
    readers = [StreamReader(gateway.url, f"queued {i}", 30) for i in range(3)]
    for r in readers:
        r.start()
    assert readers[0].started_text.wait(15) or readers[1].started_text.wait(15)
    a.kill()
    cluster.start_worker("mock", max_batch=4, **FAST_TAKEOVER)
    for r in readers:
        assert r.done.wait(40)
        assert r.errors == [] and r.text == expected(r.content, 30)


def test_no_worker_left_ends_stream_with_clear_error(cluster) -> None:  # noqa: ANN001
    a = cluster.start_worker("mock", **FAST_TAKEOVER)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway, workers=1)
    reader = StreamReader(gateway.url, "lonely", 400)
    reader.start()
    assert reader.started_text.wait(15)
    a.kill()
    killed = time.monotonic()
    assert reader.done.wait(20)
    assert time.monotonic() - killed < 15
    assert reader.errors and reader.errors[0]["code"] == "no_worker"
    assert "no worker" in reader.errors[0]["message"]


def test_client_disconnect_mid_stream_stops_generation_within_1s(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", mock_tokens_per_s=20)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    body = {
        "model": "mock",
        "messages": [{"role": "user", "content": "leave"}],
        "stream": True,
        "max_tokens": 500,
    }
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        job_id = None
        for line in resp.iter_lines():
            if line.startswith("id: ") and not line.endswith(":0"):
                job_id = line[4:].rsplit(":", 1)[0]
                break
    left = time.monotonic()
    assert job_id
    ev = park_event(cluster.redis_url, cluster.key_prefix, job_id, within=5)
    assert ev.finish_reason is None  # stopped, not finished: resumable, never a "stop"
    assert time.monotonic() - left < 1.5
    assert ev.tokens < 100


def test_killed_gateway_stops_generation_and_frees_permit(cluster) -> None:  # noqa: ANN001
    worker = cluster.start_worker("mock", mock_tokens_per_s=20)
    gateway = cluster.start_gateway(permit_lease=2)
    cluster.wait_ready(gateway)
    reader = StreamReader(gateway.url, "orphan", 500)
    reader.start()
    assert reader.started_text.wait(15)
    job_id = next(iter(job_owner(cluster.redis_url, cluster.key_prefix)))
    gateway.kill()
    killed = time.monotonic()
    ev = park_event(cluster.redis_url, cluster.key_prefix, job_id, within=5)
    assert ev.finish_reason is None  # parked: its client may resume on another gateway
    assert time.monotonic() - killed < 2.5
    wait_until(
        lambda: sem_counts(cluster.redis_url, cluster.key_prefix) == (0, 0),
        2 + 3,
        what="permit lease expiry",
    )
    assert worker.alive()
