"""Client disconnects, from the ASGI `http.disconnect` message (never by polling)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

from chatstream_cluster.shared.supervise import cancel_and_wait

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the response started."""


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (call only after the body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone = not task.done()
        await cancel_and_wait([task, watcher])
    if task.cancelled() or (gone and task.exception() is not None):
        raise ClientDisconnected()
    return task.result()
