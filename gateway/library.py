"""`ChatStreamCluster`: ChatStream's Python API for apps that keep their own FastAPI server.

A ChatStream app changes the line that builds `ChatStream(model=..., tokenizer=...)` into
`ChatStreamCluster(redis_url=...)` and keeps its routes: `handle_chat_stream_request(request,
request_body=None, callback=None)` and the other `handle_*_request` methods, `append_apis(app)`,
`start_queue_worker()` and `append_middlewares(app)` all keep their ChatStream names. The model
runs in the cluster's workers; this object only talks to Redis (see docs/migration.md).

The object may be created at import time: it connects on first use (or at
`start_queue_worker()`/`start()`), and `close()` — or the app's shutdown, once `append_apis`
ran — disconnects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from pydantic import ValidationError
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from chatstream_cluster.gateway.chatstream.api import ChatStreamAPI
from chatstream_cluster.gateway.chatstream.chat import MESSAGE_ID_HEADER
from chatstream_cluster.gateway.chatstream.constructor import from_chatstream_arguments
from chatstream_cluster.gateway.chatstream.roles import DEV_TOOL_HEADER, ClientRoles
from chatstream_cluster.gateway.disconnect import ClientDisconnected
from chatstream_cluster.gateway.errors import APIError, as_api_error
from chatstream_cluster.gateway.feedback import FeedbackHook
from chatstream_cluster.gateway.routes import openai as openai_routes
from chatstream_cluster.gateway.routes.chatstream import ENDPOINTS
from chatstream_cluster.gateway.routes.ui import (
    CHATSTREAM_UI_NAMES,
    ChatPageOptions,
    chat_page_router,
    chatstream_ui_selected,
)
from chatstream_cluster.gateway.sessions.history import HISTORY_CHAR_BUDGET
from chatstream_cluster.gateway.state import GatewayState
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS
from chatstream_cluster.shared.settings import DEFAULT_SESSION_SECRET, GatewaySettings

log = logging.getLogger("chatstream.gateway")
START_WAIT_S = 5.0  # how long the first use waits for the cluster's Redis

# ChatStream's web UI routes (its API names), served by gateway/routes/ui.py.
_UI_NAMES = {"webui_index", "webui_js"}


class ChatStreamCluster(ChatStreamAPI):
    """ChatStream's API backed by a ChatStream Cluster (Redis + workers).

    Settings come from `settings`, then keyword overrides (any GatewaySettings field, e.g.
    `redis_url`, `session_secret`, `max_queue`), then `CHATSTREAM_*` environment variables.
    ChatStream's own arguments keep working: `num_of_concurrent_executions` (cluster-wide
    here), `max_queue_size`, `max_new_tokens`, and `temperature`/`top_k`/`top_p` (the default
    generation params); `client_roles` (ChatStream's role definition, enforced on every
    endpoint; or the setting `client_roles_file`) and `request_handler` (a `RequestHandler`:
    where the history lives). `system_prompt` opens every conversation; `on_feedback(request,
    feedback)` (sync or async) receives each /set_feedback. ChatStream's other arguments:
    gateway/chatstream/constructor.py.
    """

    def __init__(
        self,
        settings: GatewaySettings | None = None,
        *,
        system_prompt: str = "",
        on_feedback: FeedbackHook | None = None,
        history_chars: int = HISTORY_CHAR_BUDGET,
        client_roles: dict[str, Any] | None = None,
        request_handler: Any = None,
        **overrides: Any,
    ) -> None:
        overrides, params = from_chatstream_arguments(overrides)
        if settings is None:
            settings = GatewaySettings(**overrides)
        elif overrides:
            settings = GatewaySettings(**{**settings.model_dump(), **overrides})
        if client_roles is not None and settings.client_roles_file:
            raise TypeError("give client_roles or client_roles_file, not both")
        roles = client_roles
        if roles is None and settings.client_roles_file:
            roles = ClientRoles.from_file(settings.client_roles_file)
        super().__init__(system_prompt=system_prompt, on_feedback=on_feedback,
                         history_chars=history_chars, default_params=params,
                         client_roles=roles, request_handler=request_handler)
        if settings.session_secret == DEFAULT_SESSION_SECRET:
            log.warning("ChatStreamCluster uses the default session secret: anyone can forge "
                        "session cookies; pass session_secret=... (or CHATSTREAM_SESSION_SECRET)")
        self.settings = settings
        self._state: GatewayState | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_lock: asyncio.Lock | None = None

    # --- lifecycle -------------------------------------------------------------------------
    async def gateway_state(self) -> GatewayState:
        """The started state, starting it on first use in this event loop."""
        loop = asyncio.get_running_loop()
        if self._state is not None and self._loop is loop:
            return self._state
        if self._start_lock is None or self._loop is not loop:
            self._start_lock, self._loop = asyncio.Lock(), loop
            if self._state is not None:
                log.warning("event loop changed: starting a new connection to the cluster")
                self._state = None  # bound to a loop that is gone; nothing to close it with
        async with self._start_lock:
            if self._state is None:
                self._state = await self._start_state()
            return self._state

    async def _start_state(self) -> GatewayState:
        """Start the connection to the cluster (background tasks that reconnect by themselves;
        requests answer 503 while Redis is unreachable)."""
        state = GatewayState(self.settings)
        await state.start()
        if await state.dispatcher.wait_connected(START_WAIT_S):
            log.info("ChatStreamCluster connected", extra={"gateway_id": state.gateway_id})
        else:
            log.warning("cannot reach the cluster's Redis yet; retrying in the background",
                        extra={"gateway_id": state.gateway_id})
        return state

    async def start(self) -> None:
        """Connect now instead of at the first request."""
        await self.gateway_state()

    async def start_queue_worker(self) -> None:
        """ChatStream's start-up call; here it connects to the cluster."""
        await self.start()

    async def close(self) -> None:
        """Let running streams end (up to 10 s), then disconnect; a later request reconnects."""
        state, self._state = self._state, None
        if state is not None and self._loop is asyncio.get_running_loop():
            await state.stop()

    @asynccontextmanager
    async def lifespan(self, _app: Any = None) -> AsyncIterator[None]:
        """For `FastAPI(lifespan=chat.lifespan)`: connect at start-up, close at shutdown."""
        await self.start()
        try:
            yield
        finally:
            await self.close()

    # --- mounting --------------------------------------------------------------------------
    def append_apis(self, app: FastAPI, opts: dict[str, Any] | None = None, *,
                    openai: bool = False) -> None:
        """Mount the ChatStream endpoints (ChatStream's `opts`: `{"all": True}`,
        `{"include": [...]}` or `{"exclude": [...]}`; None = all), with ChatStream's web UI
        (`webui_index`, `webui_js`: the chat page at `/`, configured by
        `opts["web_ui_params"]`, see `ChatPageOptions.from_web_ui_params`), and with
        `openai=True` the OpenAI-compatible `/v1` routes. The app's shutdown then closes this
        object."""
        app.state.chatstream = self
        for name in self._selected(opts):
            method, path, endpoint = ENDPOINTS[name]
            app.add_api_route(path, endpoint, methods=[method], tags=["chatstream"])
        if chatstream_ui_selected(opts):
            page = ChatPageOptions.from_web_ui_params((opts or {}).get("web_ui_params"))
            app.include_router(chat_page_router(page))
        if openai:
            app.include_router(openai_routes.router, dependencies=[Depends(self._bind_state)])
            for exc_type in (APIError, ValidationError, *TRANSIENT_REDIS_ERRORS):
                app.exception_handlers.setdefault(exc_type, _openai_error)
            app.exception_handlers.setdefault(ClientDisconnected, _client_gone)
        self._close_on_shutdown(app)

    def append_middlewares(self, app: FastAPI, opts: dict[str, Any] | None = None) -> None:
        """Sessions and roles are built in, so of ChatStream's middlewares only CORS is left:
        with `opts={"cors": {"allow_origins": [...]}}` it adds Starlette's CORSMiddleware as
        ChatStream did (credentials allowed, ChatStream's headers exposed); else a no-op."""
        cors = (opts or {}).get("cors")
        if cors is not None:
            app.add_middleware(
                CORSMiddleware, allow_origins=cors.get("allow_origins", ["*"]),
                allow_credentials=True, allow_methods=["*"], allow_headers=["*"],
                expose_headers=[DEV_TOOL_HEADER, MESSAGE_ID_HEADER],
            )

    @staticmethod
    def _selected(opts: dict[str, Any] | None) -> list[str]:
        if opts is None:
            return list(ENDPOINTS)
        given = [k for k in ("include", "exclude", "all") if k in opts]
        if len(given) > 1:
            raise ValueError(f"give only one of include, exclude, all; got {given}")
        names = set(opts.get("include") or []) | set(opts.get("exclude") or [])
        unknown = names - set(ENDPOINTS) - CHATSTREAM_UI_NAMES
        if unknown:
            raise ValueError(f"unknown API names {sorted(unknown)}; known: {list(ENDPOINTS)}")
        if "include" in opts:
            return [n for n in ENDPOINTS if n in names]
        if "exclude" in opts:
            return [n for n in ENDPOINTS if n not in names]
        return list(ENDPOINTS) if opts.get("all") else []

    async def _bind_state(self, request: Request) -> None:
        request.app.state.gateway = await self.gateway_state()

    def _close_on_shutdown(self, app: FastAPI) -> None:
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(app_: Any) -> AsyncIterator[Any]:
            async with inner(app_) as value:
                try:
                    yield value
                finally:
                    await self.close()

        app.router.lifespan_context = lifespan


async def _openai_error(_request: Request, exc: Exception) -> Response:
    """The OpenAI routes' errors as the gateway app answers them (only for our exception types;
    the app's own handlers stay as they are)."""
    return as_api_error(exc).response()


async def _client_gone(_request: Request, _exc: Exception) -> Response:
    return Response(status_code=499)
