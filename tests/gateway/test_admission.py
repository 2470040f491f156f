"""Admission through real gateway processes on a real Redis.

The cluster-wide cap (`--max-concurrent`), the bounded FIFO line (`--max-queue`), 429 with
Retry-After, `--queue-timeout`, clients that leave while waiting or streaming, and the permits
of a SIGKILLed gateway. After every test the semaphore is back to zero held and zero waiting.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from chatstream_cluster.cli import build_parser
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.schemas import ChatMessage
from chatstream_cluster.shared.semaphore import RedisSemaphore
from chatstream_cluster.shared.settings import GatewaySettings, UpSettings, settings_from_args
from chatstream_cluster.worker.mock_engine import mock_reply, render_prompt
from tests.cluster import wait_until_async as until

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
MOCK_SPEED = 20  # tokens/s per sequence: a reply of k tokens takes about k / 20 seconds


def expected_text(content: str, n: int) -> str:
    return mock_reply(render_prompt([ChatMessage(role="user", content=content)]), n)


def chat_body(content: str, max_tokens: int, *, stream: bool = True) -> dict[str, Any]:
    return {"model": "mock", "messages": [{"role": "user", "content": content}],
            "stream": stream, "max_tokens": max_tokens}


@pytest.fixture
def semaphore(redis: aioredis.Redis, key_prefix: str) -> RedisSemaphore:
    """The mock model's semaphore, seen from the test (for counts() only)."""
    return RedisSemaphore(redis, Keys(key_prefix), Keys.model_semaphore("mock"))



@pytest.fixture(autouse=True)
async def _semaphore_back_to_zero(cluster, semaphore: RedisSemaphore):  # noqa: ANN001, ANN202
    """After every test (processes still running): zero permits held, nobody waiting."""
    yield
    last: list[tuple[int, int]] = []

    async def empty() -> bool:
        last[:] = [await semaphore.counts()]
        return last[0] == (0, 0)

    await until(empty, 8.0, "the semaphore to be empty")


async def admin_status(client: httpx.AsyncClient, gateway) -> dict[str, Any]:  # noqa: ANN001
    resp = await client.get(gateway.url + "/admin/status")
    assert resp.status_code == 200, resp.text
    return resp.json()


@dataclass
class StreamResult:
    """What one client saw of one streamed chat completion."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    text: str = ""
    finish: str | None = None
    first_token_at: float | None = None
    done_at: float | None = None


async def stream_chat(
    client: httpx.AsyncClient,
    url: str,
    content: str,
    max_tokens: int,
    *,
    on_first: Callable[[], None] | None = None,
    on_done: Callable[[], None] | None = None,
) -> StreamResult:
    """POST a streamed chat completion and read it to the end (or read its error)."""
    result = StreamResult()
    async with client.stream("POST", url + CHAT, json=chat_body(content, max_tokens)) as resp:
        result.status = resp.status_code
        result.headers = dict(resp.headers)
        if resp.status_code != 200:
            result.error = orjson.loads(await resp.aread())["error"]
            return result
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in orjson.loads(line[6:]).get("choices", []):
                delta = choice["delta"].get("content") or ""
                if delta and result.first_token_at is None:
                    result.first_token_at = time.monotonic()
                    if on_first:
                        on_first()
                result.text += delta
                if choice.get("finish_reason"):
                    result.finish = choice["finish_reason"]
                    result.done_at = time.monotonic()
                    if on_done:
                        on_done()
    return result


class RawRequest:
    """A streamed chat completion on a bare socket, so the test decides when the client leaves."""

    def __init__(self, url: str, content: str, max_tokens: int) -> None:
        host, port = url.removeprefix("http://").split(":")
        payload = orjson.dumps(chat_body(content, max_tokens))
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(
            b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
            + payload
        )
        self.received = b""

    def read_until(self, marker: bytes) -> None:
        """Block until `marker` arrived (the socket's timeout bounds each read)."""
        while marker not in self.received:
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed before {marker!r}: {self.received[-500:]!r}"
            self.received += chunk

    def close(self) -> None:
        """The client goes away."""
        self.sock.close()


# --- the cap, the line, 429 ----------------------------------------------------------------


async def test_burst_never_runs_more_than_n_and_rejects_exactly_the_overflow(
    cluster,  # noqa: ANN001
) -> None:
    n, m = 2, 3
    burst = 5 * (n + m)
    tokens = 30  # 1.5 s per reply: the whole burst arrives before the first one ends
    # One worker that could run all 25 at once: only admission holds them to n.
    cluster.start_worker("mock", mock_tokens_per_s=MOCK_SPEED, max_batch=32)
    gateways = [cluster.start_gateway(max_concurrent=n, max_queue=m) for _ in range(3)]
    for gw in gateways:
        cluster.wait_ready(gw)

    live = peak = 0

    def first_token() -> None:
        nonlocal live, peak
        live += 1
        peak = max(peak, live)

    def finished() -> None:
        nonlocal live
        live -= 1

    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def sampler() -> None:
            i = 0
            while not stop.is_set():
                samples.append(await admin_status(client, gateways[i % len(gateways)]))
                i += 1
                await asyncio.sleep(0.01)

        sampling = asyncio.create_task(sampler())
        results = await asyncio.gather(*(
            stream_chat(client, gateways[i % len(gateways)].url, f"burst {i}", tokens,
                        on_first=first_token, on_done=finished)
            for i in range(burst)
        ))
        stop.set()
        await sampling

    served = [(i, r) for i, r in enumerate(results) if r.status == 200]
    rejected = [r for r in results if r.status == 429]
    assert len(served) == n + m, [r.status for r in results]
    assert len(rejected) == burst - (n + m), [r.status for r in results]
    for i, r in served:
        assert r.text == expected_text(f"burst {i}", tokens)
        assert r.finish == "length"
    for r in rejected:
        assert int(r.headers["retry-after"]) >= 1
        assert r.error["type"] == "rate_limit_error"
        assert r.error["code"] == "too_many_requests"
        assert r.error["message"]
    # Never more than n generating: client side, permits held, and the worker's own batch.
    assert peak == n
    assert samples, "the sampler saw nothing"
    assert max(s["running"] for s in samples) == n
    assert max(sum(w["running"] for w in s["workers"]) for s in samples) <= n
    assert max(s["waiting_for_permit"] for s in samples) <= m
    assert all(s["capacity"] == n for s in samples)


async def test_service_order_is_fifo_across_gateways(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", mock_tokens_per_s=MOCK_SPEED * 2, max_batch=8)
    gateways = [cluster.start_gateway(max_concurrent=1, max_queue=8) for _ in range(2)]
    for gw in gateways:
        cluster.wait_ready(gw)
    waiting = 5
    async with httpx.AsyncClient(timeout=30) as client:
        head_started = asyncio.Event()
        head = asyncio.create_task(stream_chat(client, gateways[0].url, "head", 60,
                                               on_first=head_started.set))
        await asyncio.wait_for(head_started.wait(), 10)
        tasks = []
        for i in range(waiting):
            gw = gateways[(i + 1) % 2]
            tasks.append(asyncio.create_task(stream_chat(client, gw.url, f"fifo {i}", 6)))

            async def queued(i: int = i) -> bool:
                s = await admin_status(client, gateways[i % 2])
                return s["queue_depth"] == i + 1 and s["waiting_for_permit"] == i + 1

            await until(queued, 5, f"request {i} to be waiting")
        results = await asyncio.gather(head, *tasks)
    assert all(r.status == 200 and r.finish == "length" for r in results)
    firsts = [r.first_token_at for r in results[1:]]
    assert firsts == sorted(firsts), "first tokens did not arrive in send order"
    assert results[0].done_at <= firsts[0]


async def test_queue_timeout_is_a_503_with_code_queue_timeout(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", mock_tokens_per_s=MOCK_SPEED, max_batch=4)
    gw = cluster.start_gateway(max_concurrent=1, max_queue=4, queue_timeout=1.0)
    cluster.wait_ready(gw)
    holder = RawRequest(gw.url, "hold the only slot", 400)
    try:
        holder.read_until(b'"content":"')  # generating: the only permit is taken
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=10) as client:
            resp = await client.post(gw.url + CHAT, json=chat_body("too late", 5, stream=False))
        waited = time.monotonic() - started
    finally:
        holder.close()
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["code"] == "queue_timeout"
    assert "queue" in error["message"]
    assert int(resp.headers["retry-after"]) >= 1
    assert 1.0 <= waited < 3.0


async def test_line_bound_zero_rejects_at_once(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", mock_tokens_per_s=MOCK_SPEED, max_batch=4)
    gw = cluster.start_gateway(max_concurrent=1, max_queue=0)
    cluster.wait_ready(gw)
    holder = RawRequest(gw.url, "hold", 400)
    try:
        holder.read_until(b'"content":"')
        async with httpx.AsyncClient(timeout=10) as client:
            resp = await client.post(gw.url + CHAT, json=chat_body("no room", 5))
    finally:
        holder.close()
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "1"
    assert resp.elapsed.total_seconds() < 1.0


# --- leaving: disconnects, errors, crashes -------------------------------------------------


async def test_client_that_leaves_while_waiting_leaves_the_line_at_once(
    cluster, semaphore: RedisSemaphore,  # noqa: ANN001
) -> None:
    cluster.start_worker("mock", mock_tokens_per_s=MOCK_SPEED, max_batch=4)
    gw = cluster.start_gateway(max_concurrent=1, max_queue=4)
    cluster.wait_ready(gw)
    async with httpx.AsyncClient(timeout=10) as client:
        holder = RawRequest(gw.url, "hold", 400)
        holder.read_until(b'"content":"')
        waiter = RawRequest(gw.url, "impatient", 5)
        await until(lambda: _depth_is(client, gw, 1), 5, "the waiter to queue")
        assert await semaphore.counts() == (1, 1)
        left = time.monotonic()
        waiter.close()
        # At once: well before the waiter's heartbeat (5 s) would drop it from the line.
        await until(lambda: _depth_is(client, gw, 0), 1.0, "the waiter to leave the line")
        assert time.monotonic() - left < 1.0
        assert await semaphore.counts() == (1, 0)
        # The slot it did not take still goes to the next one in line.
        holder.close()
        resp = await client.post(gw.url + CHAT, json=chat_body("next", 5, stream=False))
        assert resp.status_code == 200
        assert resp.json()["choices"][0]["message"]["content"] == expected_text("next", 5)


async def _depth_is(client: httpx.AsyncClient, gw, depth: int) -> bool:  # noqa: ANN001
    return (await admin_status(client, gw))["queue_depth"] == depth


async def test_permit_is_released_on_success_error_and_cancel(
    cluster, semaphore: RedisSemaphore,  # noqa: ANN001
) -> None:
    cluster.start_worker("mock", mock_tokens_per_s=MOCK_SPEED * 5, max_batch=4)
    gw = cluster.start_gateway(max_concurrent=2, max_queue=2)  # lease 15 s: no expiry here
    cluster.wait_ready(gw)

    async def released() -> bool:
        return await semaphore.counts() == (0, 0)

    async with httpx.AsyncClient(timeout=10) as client:
        # Success, non-streamed: released before the reply is sent.
        resp = await client.post(gw.url + CHAT, json=chat_body("ok", 5, stream=False))
        assert resp.status_code == 200
        assert await semaphore.counts() == (0, 0)
        # Success, streamed.
        result = await stream_chat(client, gw.url, "ok stream", 5)
        assert result.finish == "length"
        await until(released, 1.0, "release after a finished stream")
        # Error before any text: a prompt longer than the mock's context.
        resp = await client.post(gw.url + CHAT, json=chat_body("a " * 33_000, 5))
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "context_length_exceeded"
        await until(released, 1.0, "release after an error")
        # Cancel: the client leaves mid-stream.
        quitter = RawRequest(gw.url, "bye", 400)
        quitter.read_until(b'"content":"')
        assert (await semaphore.counts())[0] == 1
        quitter.close()
        await until(released, 1.0, "release after the client left mid-stream")


async def test_sigkilled_gateway_permits_and_waiters_come_back(
    cluster, semaphore: RedisSemaphore,  # noqa: ANN001
) -> None:
    lease = 2.0
    cluster.start_worker("mock", mock_tokens_per_s=MOCK_SPEED, max_batch=8)
    settings = {"max_concurrent": 2, "max_queue": 4, "permit_lease": lease}
    doomed, survivor = cluster.start_gateway(**settings), cluster.start_gateway(**settings)
    cluster.wait_ready(doomed)
    cluster.wait_ready(survivor)
    streams = [RawRequest(doomed.url, f"long {i}", 400) for i in range(2)]
    for s in streams:
        s.read_until(b'"content":"')
    orphan = RawRequest(doomed.url, "waits on the doomed gateway", 5)
    await until(lambda: _counts_are(semaphore, (2, 1)), 5, "two held, one waiting")
    # Refreshed past several leases while the gateway lives: nothing expires early.
    await asyncio.sleep(lease + 0.5)  # past one lease: they would have expired unrefreshed
    assert await semaphore.counts() == (2, 1)

    doomed.kill()
    killed = time.monotonic()
    for s in [*streams, orphan]:
        s.close()
    async with httpx.AsyncClient(timeout=30) as client:
        # A request on the surviving gateway waits for the dead permits, then is served.
        served = asyncio.create_task(
            client.post(survivor.url + CHAT, json=chat_body("after the crash", 5, stream=False))
        )
        await until(lambda: _held_is(semaphore, 0), lease + 1.5, "dead permits to expire")
        assert time.monotonic() - killed <= lease + 1.5
        resp = await served
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == expected_text("after the crash", 5)
    # The dead gateway's waiter stops heartbeating and leaves the line (waiter TTL 5 s).
    await until(lambda: _counts_are(semaphore, (0, 0)), 7.0, "the orphan waiter to go")


async def _held_is(semaphore: RedisSemaphore, held: int) -> bool:
    return (await semaphore.counts())[0] == held


async def _counts_are(semaphore: RedisSemaphore, counts: tuple[int, int]) -> bool:
    return await semaphore.counts() == counts


# --- capacity derived from live workers ----------------------------------------------------


async def test_derived_capacity_follows_workers_even_for_requests_already_waiting(
    cluster,  # noqa: ANN001
) -> None:
    cluster.start_worker("mock", mock_tokens_per_s=MOCK_SPEED, max_batch=1)
    gw = cluster.start_gateway(max_queue=4)  # max_concurrent 0: sum of live workers' max_batch
    cluster.wait_ready(gw)
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await admin_status(client, gw))["capacity"] == 1
        holder = RawRequest(gw.url, "hold", 400)  # 20 s, unless the test closes it
        try:
            holder.read_until(b'"content":"')
            waiting = asyncio.create_task(stream_chat(client, gw.url, "waiting", 5))
            await until(lambda: _depth_is(client, gw, 1), 5, "a request to wait")
            cluster.start_worker("mock", mock_tokens_per_s=MOCK_SPEED, max_batch=2)
            joined = time.monotonic()
            result = await asyncio.wait_for(waiting, 10)
            assert (await admin_status(client, gw))["capacity"] == 3
        finally:
            holder.close()
    assert result.status == 200 and result.finish == "length"
    # Served by the new capacity, long before the 20 s holder would have let it in.
    assert result.first_token_at - joined < 5.0


# --- flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "cls"), [("gateway", GatewaySettings), ("up", UpSettings)])
def test_admission_flags_on_gateway_and_up(command: str, cls: type) -> None:
    args = build_parser().parse_args([
        command, "--max-concurrent", "3", "--max-queue", "7", "--queue-timeout", "2.5",
        "--permit-lease", "4",
    ])
    settings = settings_from_args(cls, args)
    assert (settings.max_concurrent, settings.max_queue) == (3, 7)
    assert (settings.queue_timeout, settings.permit_lease) == (2.5, 4.0)
    defaults = cls()
    assert defaults.max_concurrent == 0  # derived from the live workers' --max-batch
    assert defaults.max_queue == 64
