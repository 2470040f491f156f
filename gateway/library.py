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
from redis.exceptions import RedisError
from starlette.responses import Response

from chatstream_cluster.gateway.chatstream.api import ChatStreamAPI
from chatstream_cluster.gateway.disconnect import ClientDisconnected
from chatstream_cluster.gateway.errors import APIError, as_api_error, redis_unavailable
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
from chatstream_cluster.shared.redis_client import REDIS_ERRORS
from chatstream_cluster.shared.settings import DEFAULT_SESSION_SECRET, GatewaySettings

log = logging.getLogger("chatstream.gateway")



# ChatStream's constructor arguments -> ours.
_RENAMED = {"num_of_concurrent_executions": "max_concurrent", "max_queue_size": "max_queue",
            "max_new_tokens": "default_max_tokens"}
_PARAMS = {"temperature": "temperature", "top_k": "top_k_value", "top_p": "top_p_value"}
_IGNORED = {"too_many_request_as_http_error", "name", "logger", "locale"}  # always 429 here
_IN_WORKERS = {"model", "tokenizer", "device", "num_gpus", "chat_prompt_clazz", "context_len",
               "use_mock_response", "mock_params", "add_special_tokens", "repetition_penalty",
               "repetition_penalty_method", "request_handler", "client_roles"}


def _from_chatstream_arguments(given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings overrides, default generation params) from keyword arguments."""
    moved = sorted(set(given) & _IN_WORKERS)
    if moved:
        raise TypeError(f"{', '.join(moved)}: the model runs in the cluster's workers; start "
                        "them with `chatstream worker --model ... --device ...`")
    overrides = {_RENAMED.get(k, k): v for k, v in given.items()
                 if k not in _IGNORED and k not in _PARAMS}
    params = {_PARAMS[k]: v for k, v in given.items() if k in _PARAMS}
    unknown = sorted(set(overrides) - set(GatewaySettings.model_fields))
    if unknown:
        raise TypeError(f"unknown settings {unknown}; see GatewaySettings for the known ones")
    return overrides, params


class ChatStreamCluster(ChatStreamAPI):
    """ChatStream's API backed by a ChatStream Cluster (Redis + workers).

    Settings come from `settings`, then keyword overrides (any GatewaySettings field, e.g.
    `redis_url`, `session_secret`, `max_queue`), then `CHATSTREAM_*` environment variables.
    ChatStream's own arguments keep working: `num_of_concurrent_executions` (cluster-wide
    here), `max_queue_size`, `max_new_tokens`, and `temperature`/`top_k`/`top_p` (the default
    generation params). `system_prompt` opens every conversation; `on_feedback(request,
    feedback)` (sync or async) receives each /set_feedback.
    """

    def __init__(
        self,
        settings: GatewaySettings | None = None,
        *,
        system_prompt: str = "",
        on_feedback: FeedbackHook | None = None,
        history_chars: int = HISTORY_CHAR_BUDGET,
        **overrides: Any,
    ) -> None:
        overrides, params = _from_chatstream_arguments(overrides)
        super().__init__(system_prompt=system_prompt, on_feedback=on_feedback,
                         history_chars=history_chars, default_params=params)
        if settings is None:
            settings = GatewaySettings(**overrides)
        elif overrides:
            settings = GatewaySettings(**{**settings.model_dump(), **overrides})
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
        state = GatewayState(self.settings)
        try:
            await state.start()
        except (TimeoutError, *REDIS_ERRORS, RedisError) as exc:
            log.warning("cannot reach the cluster's Redis", extra={"error": str(exc)})
            await state.stop()
            raise redis_unavailable() from None
        log.info("ChatStreamCluster connected", extra={"gateway_id": state.gateway_id})
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
            redis_errors = [e for e in REDIS_ERRORS if e is not OSError]
            for exc_type in (APIError, ValidationError, RedisError, *redis_errors):
                app.exception_handlers.setdefault(exc_type, _openai_error)
            app.exception_handlers.setdefault(ClientDisconnected, _client_gone)
        self._close_on_shutdown(app)

    def append_middlewares(self, app: FastAPI, opts: dict[str, Any] | None = None) -> None:
        """ChatStream's session middleware is not needed: sessions are built in (a no-op)."""

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
