"""A wait with a timeout never swallows a cancel (Python 3.11's `wait_for` can)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import pytest

from chatstream_cluster.shared.waits import wait_set

Wait = Callable[[asyncio.Event, float], Awaitable[object]]


async def _cancel_loop_turns_after_set(
    wait: Wait, turns: int, bound: float = 5
) -> asyncio.Task:
    """A loop that waits on an event forever; the event is set, and `turns` loop turns later
    (deterministic yields, not time) the loop is cancelled. Returns the loop's task."""
    event = asyncio.Event()
    blocked = asyncio.Event()

    async def loop() -> None:
        while True:
            blocked.set()
            await wait(event, 30)
            event.clear()

    task = asyncio.create_task(loop())
    await blocked.wait()
    event.set()
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait([task], timeout=bound)  # a bound: a cancelled loop ends in a turn or two
    return task


@pytest.mark.parametrize("turns", range(6))
async def test_a_cancel_in_any_loop_turn_after_the_event_ends_the_loop(turns: int) -> None:
    task = await _cancel_loop_turns_after_set(wait_set, turns)
    assert task.cancelled(), f"cancel {turns} turns after the event was lost"


async def test_the_race_is_real_with_wait_for() -> None:
    """The reason for `wait_set`: on this Python, `wait_for` loses one of these cancels."""

    async def with_wait_for(event: asyncio.Event, timeout: float) -> object:
        return await asyncio.wait_for(event.wait(), timeout)

    lost = []
    for turns in range(6):
        task = await _cancel_loop_turns_after_set(with_wait_for, turns, bound=0.5)
        if not task.done():
            lost.append(turns)
            task.cancel()
            await asyncio.wait([task], timeout=5)
    if sys.version_info >= (3, 12):
        assert lost == []  # fixed in 3.12: `wait_for` is built on `asyncio.timeout`
    else:
        assert lost, "wait_for kept every cancel: the race this module avoids is gone"


async def test_wait_set_answers_true_when_set_false_on_timeout() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    assert await wait_set(event, -1) is False
    event.set()
    assert await wait_set(event, 0) is True
