"""Streams held open from a background event loop, for pages to watch a loaded cluster."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import httpx


class StreamLoad:
    """`n` concurrent OpenAI streams of `max_tokens` each (with `repeat`, each starts again
    when it ends) until `stop()`, which closes their connections."""

    def __init__(self, url: str, n: int, max_tokens: int = 1000, *, repeat: bool = False) -> None:
        self.body = {"model": "mock", "stream": True, "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": "keep going"}]}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.task = self._in_loop(self._start(url, n, repeat))

    def _in_loop(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self, url: str, n: int, repeat: bool) -> asyncio.Task:
        return asyncio.create_task(self._run(url, n, repeat))

    async def _run(self, url: str, n: int, repeat: bool) -> None:
        async with httpx.AsyncClient(timeout=120) as client:

            async def one() -> None:
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        async with client.stream("POST", url + "/v1/chat/completions",
                                                 json=self.body) as resp:
                            async for _ in resp.aiter_bytes():
                                pass
                    if not repeat:
                        return

            await asyncio.gather(*(one() for _ in range(n)))

    def stop(self) -> None:
        """Cancel the streams (their connections close) and end the loop."""

        async def cancel() -> None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

        self._in_loop(cancel())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
