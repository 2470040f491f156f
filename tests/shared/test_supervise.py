"""Supervisor shutdown: every task ends, even one that swallowed a cancel."""

from __future__ import annotations

import asyncio

from chatstream_cluster.shared.supervise import Supervisor, cancel_and_wait


def _swallows_first_cancel(started: asyncio.Event, swallowed: asyncio.Event):  # noqa: ANN202
    """A loop that eats one cancel and sleeps on, as one does after Python 3.11's `wait_for`
    returns a result that completed in the same turn as the cancel."""

    async def loop() -> None:
        started.set()
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed.is_set():
                    raise
                swallowed.set()

    return loop


async def test_stop_ends_a_task_that_swallowed_the_first_cancel() -> None:
    started, swallowed = asyncio.Event(), asyncio.Event()
    supervisor = Supervisor()
    supervisor.start("stubborn", _swallows_first_cancel(started, swallowed))
    await started.wait()
    stop = asyncio.create_task(supervisor.stop())
    done, _ = await asyncio.wait([stop], timeout=10)  # a bound, not a wait: it ends at once
    assert stop in done, "stop() hangs on a task that swallowed one cancel"
    assert swallowed.is_set()
    assert supervisor.tasks["stubborn"].cancelled()


async def test_cancel_and_wait_retrieves_a_crash_and_leaves_finished_tasks() -> None:
    async def crash() -> None:
        raise RuntimeError("boom")

    crashed = asyncio.create_task(crash())
    finished = asyncio.create_task(asyncio.sleep(0, result=7))
    await asyncio.wait([crashed, finished])
    await cancel_and_wait([crashed, finished])
    assert finished.result() == 7
    assert isinstance(crashed.exception(), RuntimeError)
