"""`chatstream gateway`: serve the app with uvicorn (uvloop and httptools when installed)."""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import socket
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn

from chatstream_cluster.gateway.app import create_app
from chatstream_cluster.gateway.security import check_startup
from chatstream_cluster.shared.logs import setup_logging
from chatstream_cluster.shared.settings import GatewaySettings

#: How uvicorn serves the gateway; bench/baseline_app.py serves its baseline the same way.
#: "auto" picks uvloop and httptools when installed (uvicorn[standard] installs both).
UVICORN_OPTIONS: dict[str, Any] = {
    "loop": "auto",
    "http": "auto",
    "log_config": None,
    "access_log": False,
}


class _UnfinishedStreamFilter(logging.Filter):
    """uvicorn reports a response left unfinished as an error; for a stream that did not end
    normally that is deliberate (gateway/streaming.py logs it with its job id)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


class GatewayServer(uvicorn.Server):
    """uvicorn's server, draining on SIGTERM/SIGINT and exiting 0 afterwards.

    On the signal the gateway reports not ready (so a load balancer stops sending), refuses
    new generations, and lets open streams finish for up to `--drain-timeout`.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # What is alive now (modules, classes, the app, its clients) lives as long as the
        # process: freeze it out of the collector's full passes. Otherwise each gen-2
        # collection walks all of it — measured pauses of up to ~100 ms with 1,000 streams
        # open, every stream stalled meanwhile (docs/performance.md).
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = getattr(self.config.app.state, "gateway", None)
        if state is not None:
            state.draining = True
        super().handle_exit(sig, frame)


def main(settings: GatewaySettings) -> int:
    """Run one gateway process until SIGTERM/SIGINT; open streams get `--drain-timeout`."""
    setup_logging(settings.log_level, settings.log_format, component="gateway")
    logging.getLogger("uvicorn.error").addFilter(_UnfinishedStreamFilter())
    check_startup(settings)  # exits 2, before binding, on an unsafe configuration
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=settings.drain_timeout,  # 0: cut open streams at once
        lifespan="on",
        **UVICORN_OPTIONS,
    )
    GatewayServer(config).run()
    return 0
