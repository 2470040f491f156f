"""Streaming benchmark clients: many concurrent SSE streams, TTFT and tokens per stream.

`run_streams` uses httpx (what an application would use). `run_raw_streams` speaks HTTP/1.1
over raw asyncio streams and parses SSE lines itself: light enough to hold a thousand streams
from one process without becoming the bottleneck, and it records when each chunk arrived.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson


@dataclass
class StreamResult:
    status: int = 0
    ttft: float = 0.0
    seconds: float = 0.0
    tokens: int = 0
    events: int = 0
    gaps: list[float] = field(default_factory=list)
    error: str = ""
    marks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens so far)


async def stream_once(client: httpx.AsyncClient, body: dict[str, Any]) -> StreamResult:
    """One OpenAI SSE stream; tokens come from the final usage chunk."""
    result = StreamResult()
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            result.status = resp.status_code
            if resp.status_code != 200:
                result.error = (await resp.aread()).decode(errors="replace")[:200]
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                data = orjson.loads(line[6:])
                if data.get("usage"):
                    result.tokens = data["usage"]["completion_tokens"]
                for choice in data.get("choices", ()):
                    if choice["delta"].get("content"):
                        result.events += 1
                        if not result.ttft:
                            result.ttft = now - start
                        else:
                            result.gaps.append(now - last)
                        last = now
                if "error" in data:
                    result.error = data["error"].get("message", "error")
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(results: list[StreamResult], concurrency: int, seconds: float) -> dict[str, Any]:
    ok = [r for r in results if r.status == 200 and not r.error]
    ttfts = [r.ttft for r in ok if r.ttft]
    tokens = sum(r.tokens for r in ok)
    gaps = [g for r in ok for g in r.gaps]
    return {
        "concurrency": concurrency,
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "first_error": next((r.error for r in results if r.error), ""),
        "tokens": tokens,
        "events_per_stream": round(sum(r.events for r in ok) / len(ok), 1) if ok else 0.0,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1) if ttfts else None,
        "ttft_p99_ms": round(percentile(ttfts, 0.99) * 1000, 1) if ttfts else None,
        "gap_p99_ms": round(percentile(gaps, 0.99) * 1000, 1) if gaps else None,
    }


async def run_streams(
    url: str, concurrency: int, body: dict[str, Any], *, timeout: float = 300
) -> dict[str, Any]:
    """`concurrency` identical streams at once; aggregate tokens/s and TTFT percentiles."""
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_once(client, body) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return _summary(results, concurrency, seconds)


# --- raw HTTP/1.1 client ---------------------------------------------------------------------
def _request_bytes(host: str, port: int, body: dict[str, Any]) -> bytes:
    payload = orjson.dumps(body)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + payload


def _on_event(result: StreamResult, event: bytes, now: float, start: float) -> None:
    """One SSE event (without its blank line): count the mock's tokens (one word + space)."""
    pos = event.find(b"data: {")
    if pos < 0:
        return
    data = orjson.loads(event[pos + 6 :])
    if data.get("usage"):
        result.tokens = data["usage"]["completion_tokens"]
    if "error" in data:
        result.error = data["error"].get("message", "error")
    for choice in data.get("choices", ()):
        content = choice["delta"].get("content")
        if content:
            result.events += 1
            if not result.ttft:
                result.ttft = now - start
            else:
                result.gaps.append(now - result.marks[-1][0])
            done = result.marks[-1][1] if result.marks else 0
            result.marks.append((now, done + content.count(" ")))


async def raw_stream_once(host: str, port: int, request: bytes) -> StreamResult:
    """One OpenAI SSE stream over a raw connection (chunked transfer decoding, SSE parsing)."""
    result = StreamResult()
    start = time.perf_counter()
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        status_line = await reader.readline()
        result.status = int(status_line.split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if result.status != 200:
            result.error = (await reader.read(2000)).decode(errors="replace")[:200]
            return result
        buf = b""
        while True:
            if chunked:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
            now = time.perf_counter()
            buf += data
            *events, buf = buf.split(b"\n\n")
            for event in events:
                _on_event(result, event, now, start)
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
    result.seconds = time.perf_counter() - start
    return result


async def run_raw_streams(
    url: str, concurrency: int, body: dict[str, Any], *, timeout: float = 300
) -> tuple[dict[str, Any], list[StreamResult]]:
    """`concurrency` streams at once on raw connections: the summary and each stream's result."""
    host, _, port = url.removeprefix("http://").partition(":")
    request = _request_bytes(host, int(port), body)
    start = time.perf_counter()
    tasks = [raw_stream_once(host, int(port), request) for _ in range(concurrency)]
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    return _summary(results, concurrency, time.perf_counter() - start), results


def schedule_lateness(marks: list[tuple[float, int]], tokens_per_s: float) -> list[float]:
    """How late each chunk arrived against the engine's fixed token schedule.

    At a set speed token k (1-based) is due at t0 + (k - 1) / rate. The stream's earliest
    chunk relative to that schedule fixes t0 (the least-delayed delivery), so each value is
    the extra delay of that chunk's last token: what engine scheduling, publishing, Redis, the
    gateway and the client added beyond the best case. Never negative.
    """
    if not marks:
        return []
    offsets = [t - (k - 1) / tokens_per_s for t, k in marks]
    base = min(offsets)
    return [o - base for o in offsets]
