"""Supervised background tasks: a crash is logged, counted and the task restarted with backoff.

`Supervisor.start(name, factory)` runs `factory()` (a coroutine function) as a task. A task
that returns has finished its work (a loop told to stop). When the task raises, the exception
is logged with its traceback, `failures[name]` counts it, and the task is started again after a
backoff (0.5 s, doubling, at most 10 s; reset after a minute of
good health). While a task is down — between its crash and its restart — `healthy()` is
False, so a process's readiness probe (`/readyz`) answers 503 and an orchestrator can replace a
process whose task keeps crashing. Cancellation (shutdown) is not a crash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger("chatstream.supervise")

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
HEALTHY_AFTER_S = 60.0

TaskFactory = Callable[[], Awaitable[None]]
RECANCEL_EVERY_S = 0.2


async def cancel_and_wait(tasks: Iterable[asyncio.Task]) -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again while one runs on.

    One cancel is not always enough on Python 3.11: `asyncio.wait_for` returns the inner
    result when it completes in the same loop turn as the cancel (and redis-py may turn a
    cancel into a connection error), so a loop can swallow the cancel and go back to sleep.
    """
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=RECANCEL_EVERY_S)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a crash at shutdown is not "never retrieved"


class Supervisor:
    """Keeps named background tasks running."""

    def __init__(self, on_failure: Callable[[str, BaseException], None] | None = None) -> None:
        self.tasks: dict[str, asyncio.Task] = {}
        self.failures: dict[str, int] = {}
        self.down: dict[str, str] = {}  # name -> the error that stopped it, until it restarts
        self._on_failure = on_failure
        self._stopping = False

    def start(self, name: str, factory: TaskFactory) -> None:
        """Run `factory()` under supervision as task `name`."""
        self.tasks[name] = asyncio.create_task(self._keep(name, factory), name=name)

    def healthy(self) -> bool:
        """True while no supervised task is down."""
        return not self.down

    async def stop(self) -> None:
        """Cancel every task and wait for them."""
        self._stopping = True
        await cancel_and_wait(self.tasks.values())

    async def _keep(self, name: str, factory: TaskFactory) -> None:
        delay = BACKOFF_START_S
        while not self._stopping:
            started = time.monotonic()
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any crash: log, count, restart
                if time.monotonic() - started > HEALTHY_AFTER_S:
                    delay = BACKOFF_START_S
                self.failures[name] = self.failures.get(name, 0) + 1
                self.down[name] = f"{type(exc).__name__}: {exc}"[:300]
                log.error("background task crashed; restarting", exc_info=exc,
                          extra={"task": name, "in_s": delay, "failures": self.failures[name]})
                if self._on_failure is not None:
                    self._on_failure(name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                self.down.pop(name, None)
