"""`chatstream worker`: build the engine, run the worker loop, drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from chatstream_cluster.shared.jobqueue import PartitionMismatch
from chatstream_cluster.shared.logs import setup_logging
from chatstream_cluster.shared.settings import WorkerSettings
from chatstream_cluster.worker.engine.faults import cold_start_seconds
from chatstream_cluster.worker.engine_api import Engine, UnsupportedModel
from chatstream_cluster.worker.factory import make_engine, warm_up
from chatstream_cluster.worker.loop import Worker

log = logging.getLogger("chatstream.worker")


async def serve(settings: WorkerSettings) -> int:
    """Run one worker until SIGTERM/SIGINT, then drain; the exit code (1: the engine died or
    kept failing, 2: the model or its settings cannot be served, with the reason logged).

    A signal while the model loads (a pod scaled away before it was ready) ends the process
    at once with 0: it holds no job and is in no registry yet, and a load cannot be cut short
    (it runs in a thread)."""
    worker: Worker | None = None

    def on_stop_signal() -> None:
        if worker is None:
            log.info("stopped while starting: nothing to drain", extra={"model": settings.model})
            logging.shutdown()
            os._exit(0)
        worker.drain()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal)
    try:
        engine = await asyncio.to_thread(_load, settings)
    except UnsupportedModel as exc:
        log.error("cannot serve this model: %s", exc, extra={"model": settings.model})
        return 2
    await asyncio.to_thread(warm_up, engine)
    worker = Worker(settings, engine)
    try:
        await worker.run()
    except PartitionMismatch as exc:
        log.error(str(exc))
        return 2
    return 1 if worker.engine_failed else 0


def _load(settings: WorkerSettings) -> Engine:
    """The engine, after the TEST ONLY fake cold start (worker/engine/faults.py), which waits
    where a real model load takes its time."""
    delay = cold_start_seconds()
    if delay:
        log.warning("test-only cold start: waiting before loading the model",
                    extra={"seconds": round(delay, 1)})
        time.sleep(delay)
    return make_engine(settings)


def main(settings: WorkerSettings) -> int:
    """Entry point of `chatstream worker`; exit code 0 after a graceful drain."""
    setup_logging(settings.log_level, settings.log_format, component="worker")
    return asyncio.run(serve(settings))
