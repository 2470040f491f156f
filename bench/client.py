"""A streaming benchmark client: many concurrent SSE streams, TTFT and tokens per stream."""

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


async def run_streams(
    url: str, concurrency: int, body: dict[str, Any], *, timeout: float = 300
) -> dict[str, Any]:
    """`concurrency` identical streams at once; aggregate tokens/s and TTFT percentiles."""
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_once(client, body) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
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
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1) if ttfts else None,
        "ttft_p99_ms": round(percentile(ttfts, 0.99) * 1000, 1) if ttfts else None,
        "gap_p99_ms": round(percentile(gaps, 0.99) * 1000, 1) if gaps else None,
    }
