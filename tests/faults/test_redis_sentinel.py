"""Sentinel (1 primary, 1 replica, 3 sentinels) under a real gateway and worker: the primary is
SIGKILLed during 200 streams, and a manual failover moves every connection to the new primary."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httpx
import orjson
import pytest

from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.redis_client import make_redis
from chatstream_cluster.shared.semaphore import RedisSemaphore
from tests.cluster import Cluster, wait_until
from tests.faults.test_worker_crash import expected

pytestmark = pytest.mark.slow

STREAMS = 200
TOKENS = 80  # 4 s at 20 tokens/s: every stream is mid-way when the primary dies
LEASE_S = 3.0


@dataclass
class Outcome:
    content: str
    status: int = 0
    text: str = ""
    finish: str | None = None
    errors: list[str] = field(default_factory=list)


async def stream(client: httpx.AsyncClient, content: str, started: asyncio.Event,
                 counter: list[int]) -> Outcome:
    out = Outcome(content)
    body = {"model": "mock", "messages": [{"role": "user", "content": content}],
            "stream": True, "max_tokens": TOKENS}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            out.status = resp.status_code
            if resp.status_code != 200:
                out.errors.append((await resp.aread()).decode(errors="replace"))
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = orjson.loads(line[6:])
                if "error" in data:
                    out.errors.append(data["error"]["message"])
                for choice in data.get("choices", ()):
                    if choice["delta"].get("content") and not out.text:
                        counter[0] += 1
                        if counter[0] == STREAMS:
                            started.set()
                    out.text += choice["delta"].get("content") or ""
                    out.finish = choice.get("finish_reason") or out.finish
    except httpx.HTTPError as exc:
        out.errors.append(f"transport: {exc}")
    return out


async def streams_through_a_kill(url: str, kill) -> list[Outcome]:  # noqa: ANN001
    """STREAMS streams at once; `kill()` runs once every one of them has text."""
    started, counter = asyncio.Event(), [0]
    limits = httpx.Limits(max_connections=STREAMS + 10)
    async with httpx.AsyncClient(base_url=url, timeout=90, limits=limits) as client:
        tasks = [asyncio.create_task(stream(client, f"sentinel {i}", started, counter))
                 for i in range(STREAMS)]
        await asyncio.wait_for(started.wait(), 60)
        await asyncio.to_thread(kill)
        return await asyncio.gather(*tasks)


async def held_permits(url: str, prefix: str) -> list[str]:
    redis = make_redis(url)
    try:
        return await RedisSemaphore(redis, Keys(prefix), Keys.model_semaphore("mock")).holders()
    finally:
        await redis.aclose()


@pytest.fixture
def on_sentinel(redis_sentinel, key_prefix, tmp_path):  # noqa: ANN001, ANN201
    procs = Cluster(redis_sentinel.url, key_prefix, tmp_path)
    worker = procs.start_worker("mock", mock_tokens_per_s=20, max_batch=STREAMS)
    gateway = procs.start_gateway(max_queue=STREAMS, permit_lease=LEASE_S)
    procs.wait_ready(gateway)
    yield procs, gateway, worker
    procs.stop()


def test_primary_killed_during_200_streams(redis_sentinel, on_sentinel, key_prefix) -> None:  # noqa: ANN001
    procs, gateway, worker = on_sentinel
    pids = (gateway.pid, worker.pid)
    killed: list[int] = []
    outcomes = asyncio.run(
        streams_through_a_kill(gateway.url, lambda: killed.append(redis_sentinel.kill_primary()))
    )
    exact = 0
    for out in outcomes:
        want = expected(out.content, TOKENS)
        if out.errors or out.finish == "error":
            assert out.errors, f"an error finish without an error message: {out}"
            assert want.startswith(out.text), f"text changed before the error: {out}"
        else:  # no error: it must be complete and exact, never silently cut
            assert out.status == 200 and out.finish == "length", out
            assert out.text == want, out
            exact += 1
    # A stream running when Redis fails over rides it out (the relay waits up to 30 s).
    reasons = sorted({e[:120] for out in outcomes for e in out.errors})
    assert exact >= STREAMS * 0.95, f"only {exact} of {STREAMS} streams were exact: {reasons}"

    new_primary = redis_sentinel.wait_new_primary(killed[0])
    assert new_primary != killed[0]
    # No permit outlives its lease: every stream has ended, so none may be held after it.
    wait_until(lambda: asyncio.run(held_permits(redis_sentinel.url, key_prefix)) == [],
               LEASE_S + 10, what="every permit to be released or to expire")
    # Service resumes on the new primary with the same gateway and worker processes.
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        body = {"model": "mock", "messages": [{"role": "user", "content": "after"}],
                "max_tokens": 5}
        resp = wait_until(lambda: _ok(client.post("/v1/chat/completions", json=body)), 30,
                          interval=0.5, what="a request to succeed after the failover")
    assert resp.json()["choices"][0]["message"]["content"] == expected("after", 5)
    assert (gateway.pid, worker.pid) == pids and gateway.alive() and worker.alive()


def _ok(resp: httpx.Response) -> httpx.Response | None:
    return resp if resp.status_code == 200 else None


def test_a_manual_failover_moves_every_connection_to_the_new_primary(
    redis_sentinel, on_sentinel  # noqa: ANN001
) -> None:
    """redis-py keeps open connections on a demoted primary (reads and subscriptions go on
    there); the processes follow `+switch-master` and leave it."""
    procs, gateway, worker = on_sentinel
    old = redis_sentinel.primary_port()
    assert _our_clients(redis_sentinel, old), "the processes should be connected to the primary"
    with redis_sentinel.client(redis_sentinel.sentinels[0].port) as sentinel:
        sentinel.execute_command("SENTINEL", "FAILOVER", redis_sentinel.master_name)
    new = redis_sentinel.wait_new_primary(old)
    wait_until(lambda: not _our_clients(redis_sentinel, old), 20,
               what="no connection of ours left on the demoted primary")
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        body = {"model": "mock", "messages": [{"role": "user", "content": "moved"}],
                "max_tokens": 5, "stream": True}
        resp = wait_until(lambda: _ok(client.post("/v1/chat/completions", json=body)), 30,
                          interval=0.5, what="a stream through the new primary")
    assert "[DONE]" in resp.text
    assert _our_clients(redis_sentinel, new)


def _our_clients(setup, port: int) -> list[str]:  # noqa: ANN001
    """Connections of the gateway and worker (redis-py, not this test's own) on a node."""
    with setup.client(port) as c:
        me = c.client_id()
        return [
            line for line in c.execute_command("CLIENT", "LIST").decode().splitlines()
            if "lib-name=redis-py" in line and f"id={me} " not in line
        ]
