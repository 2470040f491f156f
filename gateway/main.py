"""`chatstream gateway`: serve the app with uvicorn (uvloop and httptools when installed)."""

from __future__ import annotations

import uvicorn

from gateway.app import create_app
from shared.logs import setup_logging
from shared.settings import GatewaySettings


def main(settings: GatewaySettings) -> int:
    """Run one gateway process until SIGTERM/SIGINT; open streams get `--drain-timeout`."""
    setup_logging(settings.log_level, settings.log_format, component="gateway")
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout) or None,
        loop="auto",
        http="auto",
        lifespan="on",
    )
    uvicorn.Server(config).run()
    return 0
