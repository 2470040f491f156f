"""The gateway's FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.responses import Response

from chatstream_cluster.gateway.auth import AuthMiddleware
from chatstream_cluster.gateway.disconnect import ClientDisconnected
from chatstream_cluster.gateway.errors import install_error_handlers
from chatstream_cluster.gateway.routes import admin, chatstream, health, openai, ops, ui
from chatstream_cluster.gateway.state import GatewayState
from chatstream_cluster.shared.settings import GatewaySettings


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """A gateway app; its lifespan connects to Redis and subscribes before serving."""
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = GatewayState(settings)
        await state.start()
        app.state.gateway = state
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="ChatStream Cluster", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_request, _exc) -> Response:  # noqa: ANN001
        return Response(status_code=499)

    app.include_router(openai.router)
    app.state.chatstream = chatstream.GatewayChatStream(app, settings)  # reads the roles file
    app.include_router(chatstream.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(ops.router)
    _include_pages(app, settings)
    # Keys are checked before any route runs (and before a body is read); see gateway/auth.py.
    app.add_middleware(AuthMiddleware, settings=settings)
    return app


def _include_pages(app: FastAPI, settings: GatewaySettings) -> None:
    """The chat page (`--no-ui` leaves it out) and the ops page (`--no-ops-page`)."""
    if settings.ui:
        app.include_router(ui.chat_page_router(ui.ChatPageOptions(
            title=settings.ui_title, welcome_message=settings.ui_welcome_message,
            api_key_required=bool(settings.api_keys),
        )))
    if settings.ops_page:
        app.include_router(ui.ops_page_router())
        if not settings.ui:
            app.include_router(ui.assets_router())
