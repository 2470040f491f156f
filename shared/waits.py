"""Waiting with a timeout without ever swallowing a cancel.

Python 3.11's `asyncio.wait_for` returns the awaited result when it completes in the same loop
turn as a cancel of the waiting task, which loses the cancel: a loop that waits this way can run
on after shutdown cancelled it, or return a permit to a caller that is gone. `asyncio.timeout`
has no such race, so every wait with a timeout in this project goes through it.
"""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, timeout: float) -> bool:  # noqa: ASYNC109
    """True once `event` is set; False after `timeout` seconds without."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()
    except TimeoutError:
        return False
    return True
