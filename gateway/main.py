"""`chatstream gateway`: serve the app with uvicorn (uvloop and httptools when installed)."""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import socket
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn

from chatstream_cluster.gateway.app import create_app
from chatstream_cluster.gateway.http_limits import HttpLimits, fit_open_files, limited_protocol
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

log = logging.getLogger("chatstream.gateway")


def server_options(settings: GatewaySettings, max_connections: int) -> dict[str, Any]:
    """UVICORN_OPTIONS plus the gateway's HTTP limits (gateway/http_limits.py): httptools with
    header sizes, timeouts and a connection cap; no WebSocket upgrades (no route takes one)."""
    limits = HttpLimits.from_settings(settings, max_connections)
    return {
        **UVICORN_OPTIONS,
        "http": limited_protocol(limits),
        "ws": "none",
        "timeout_keep_alive": settings.keep_alive_timeout,
    }


class _UnfinishedStreamFilter(logging.Filter):
    """uvicorn reports a response left unfinished as an error; for a stream that did not end
    normally that is deliberate (gateway/streaming.py logs it with its job id)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


class GatewayServer(uvicorn.Server):
    """uvicorn's server, leaving gracefully on SIGTERM/SIGINT and exiting 0 afterwards.

    On the signal the gateway first reports not ready (`/readyz` 503) for `shutdown_grace`
    seconds while it still accepts and serves, so a load balancer takes it out of rotation;
    then it stops accepting, refuses new generations and lets open streams finish for up to
    `--drain-timeout`. A second signal skips what is left of the grace.
    """

    def __init__(self, config: uvicorn.Config, shutdown_grace: float = 0.0) -> None:
        super().__init__(config)
        self.shutdown_grace = shutdown_grace
        self.leave_at: float | None = None

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

    def _state(self) -> Any:
        return getattr(self.config.app.state, "gateway", None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self._state()
        if self.leave_at is None and self.shutdown_grace > 0 and not self.should_exit:
            self.leave_at = time.monotonic() + self.shutdown_grace
            if state is not None:
                state.leaving = True
            log.info("shutdown requested: not ready, still serving",
                     extra={"grace_s": self.shutdown_grace})
            return
        if state is not None:
            state.leaving = state.draining = True
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.leave_at is not None and not self.should_exit \
                and time.monotonic() >= self.leave_at:
            state = self._state()
            if state is not None:
                state.draining = True
            self.should_exit = True
        return await super().on_tick(counter)


def main(settings: GatewaySettings) -> int:
    """Run one gateway process until SIGTERM/SIGINT (then `--shutdown-grace` not ready, then
    open streams get `--drain-timeout`)."""
    setup_logging(settings.log_level, settings.log_format, component="gateway")
    logging.getLogger("uvicorn.error").addFilter(_UnfinishedStreamFilter())
    check_startup(settings)  # exits 2, before binding, on an unsafe configuration
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=settings.drain_timeout,  # 0: cut open streams at once
        lifespan="on",
        **server_options(settings, fit_open_files(settings.max_connections)),
    )
    GatewayServer(config, settings.shutdown_grace).run()
    return 0
