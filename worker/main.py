"""`chatstream worker`: build the engine, run the worker loop, drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from chatstream_cluster.shared.jobqueue import PartitionMismatch
from chatstream_cluster.shared.logs import setup_logging
from chatstream_cluster.shared.settings import WorkerSettings
from chatstream_cluster.shared.waits import wait_set
from chatstream_cluster.worker.engine.faults import cold_start_seconds
from chatstream_cluster.worker.engine_api import UnsupportedModel
from chatstream_cluster.worker.factory import make_engine, warm_up
from chatstream_cluster.worker.loop import Worker

log = logging.getLogger("chatstream.worker")


async def serve(settings: WorkerSettings) -> int:
    """Run one worker until SIGTERM/SIGINT, then drain; the exit code (1: the engine died or
    kept failing, 2: the model or its settings cannot be served, with the reason logged)."""
    if not await _fake_cold_start():
        return 0
    try:
        engine = await asyncio.to_thread(make_engine, settings)
    except UnsupportedModel as exc:
        log.error("cannot serve this model: %s", exc, extra={"model": settings.model})
        return 2
    await asyncio.to_thread(warm_up, engine)
    worker = Worker(settings, engine)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.drain)
    try:
        await worker.run()
    except PartitionMismatch as exc:
        log.error(str(exc))
        return 2
    return 1 if worker.engine_failed else 0


async def _fake_cold_start() -> bool:
    """TEST ONLY (worker/engine/faults.py): wait as a starting pod would; False when SIGTERM or
    SIGINT came meanwhile (the worker then exits 0, as one scaled away before it was ready)."""
    delay = cold_start_seconds()
    if not delay:
        return True
    log.warning("test-only cold start: waiting before loading the model",
                extra={"seconds": round(delay, 1)})
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return not await wait_set(stop, delay)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(settings: WorkerSettings) -> int:
    """Entry point of `chatstream worker`; exit code 0 after a graceful drain."""
    setup_logging(settings.log_level, settings.log_format, component="worker")
    return asyncio.run(serve(settings))
