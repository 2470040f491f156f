"""A stream whose model has no live worker yet (scale from zero, `--cold-start-timeout`).

Such a request waits in its model's line while an autoscaler starts a worker, which takes tens
of seconds: too long to keep a client and the proxies on its way without a byte. So the answer
starts at once (200, `text/event-stream`) and, while the generation starts, an SSE comment
(`: waiting ...`, ignored by SSE clients) goes out every `KEEPALIVE_S` seconds. Then the
stream goes on as any other (gateway/completions/encode.py).

A start that fails after the answer began (no worker started in time: `cold_start_timeout`,
the line was full, Redis gone) cannot be an HTTP status any more: the stream carries it as its
error event and ends with `[DONE]`, never with a finish reason, so it never looks complete.
A client that leaves while waiting leaves the line (the start is cancelled).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from chatstream_cluster.gateway.completions.encode import DONE, error_event, sse_events
from chatstream_cluster.gateway.errors import as_api_error
from chatstream_cluster.gateway.generation import Generation
from chatstream_cluster.shared.supervise import cancel_and_wait

KEEPALIVE_S = 5.0


async def cold_start_events(
    gen: Generation, model: str, include_usage: bool, keepalive_s: float = KEEPALIVE_S
) -> AsyncIterator[bytes]:
    """SSE comments while `gen` starts, then its events (or its start's error and [DONE])."""
    start = asyncio.ensure_future(gen.start(None))
    try:
        yield b": waiting for a worker of this model to start\n\n"
        while not start.done():
            await asyncio.wait({start}, timeout=keepalive_s)
            if not start.done():
                yield b": still waiting for a worker\n\n"
    finally:
        if not start.done():  # the client left (the response closes this generator)
            await cancel_and_wait([start])
    failure = start.exception()
    if failure is not None:
        err = as_api_error(failure)
        yield error_event(gen.failed_to_start(err.code or "error", err.message, err.status))
        yield DONE
        return
    async for chunk in sse_events(gen, model, include_usage):
        yield chunk
