"""`ChatStreamAPI`: every ChatStream endpoint under ChatStream's method name, with one error path.

Subclasses say where the gateway state comes from: the gateway app's own state
(gateway/routes/chatstream.py) or a user's app (`ChatStreamCluster`, gateway/library.py).
Every failure becomes a JSON answer with ChatStream's `success`/`message` keys plus the
gateway's `error` object; nothing raises into the user's app.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from chatstream_cluster.gateway.chatstream import cluster_endpoints, session_endpoints
from chatstream_cluster.gateway.chatstream.chat import ChatOptions, chat_turn
from chatstream_cluster.gateway.chatstream.context import (
    SessionBinding,
    SessionContext,
    json_object,
)
from chatstream_cluster.gateway.disconnect import ClientDisconnected
from chatstream_cluster.gateway.errors import as_api_error, describe
from chatstream_cluster.gateway.feedback import FeedbackHook
from chatstream_cluster.gateway.generation import DISCONNECTED_BEFORE_STREAMING, UNKNOWN_ERROR
from chatstream_cluster.gateway.sessions.history import HISTORY_CHAR_BUDGET
from chatstream_cluster.gateway.sessions.params import DEFAULT_PARAMS, GenerationParams
from chatstream_cluster.gateway.sessions.turn import Notifier
from chatstream_cluster.gateway.state import GatewayState

# callback(request, message): ChatStream's stream-end callback; may be a coroutine function.
Callback = Callable[[Request, str], Any]
CLIENT_GONE = 499  # nginx's "client closed request": nobody reads this answer


def _guarded(method: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Turn the errors of an endpoint method into JSON responses (it may run in a user's app)."""

    @functools.wraps(method)
    async def wrapper(self: ChatStreamAPI, request: Request, *args: Any, **kw: Any) -> Response:
        try:
            return await method(self, request, *args, **kw)
        except (ClientDisconnected, ClientDisconnect):
            return Response(status_code=CLIENT_GONE)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON answer
            return as_api_error(exc).chatstream_response()

    return wrapper


class ChatStreamAPI:
    """ChatStream's endpoints over one gateway state.

    `system_prompt` is sent first with every turn and never trimmed; `on_feedback(request,
    feedback)` receives each /set_feedback; `history_chars` caps the history sent per turn;
    `default_params` (temperature, top_k_value, top_p_value) replace ChatStream's defaults.
    """

    def __init__(
        self,
        *,
        system_prompt: str = "",
        on_feedback: FeedbackHook | None = None,
        history_chars: int = HISTORY_CHAR_BUDGET,
        default_params: dict[str, Any] | None = None,
    ) -> None:
        given = GenerationParams.model_validate(default_params or {})
        self.options = ChatOptions(
            system_prompt=system_prompt, history_chars=history_chars,
            default_params={**DEFAULT_PARAMS, **given.model_dump(exclude_none=True)},
        )
        self.on_feedback = on_feedback
        self._sessions = SessionBinding()

    @property
    def default_params(self) -> dict[str, Any]:
        return self.options.default_params

    async def gateway_state(self) -> GatewayState:
        """The started GatewayState to serve with."""
        raise NotImplementedError

    async def _context(self, request: Request) -> SessionContext:
        return self._sessions.context(await self.gateway_state(), request)

    async def _body(self, ctx: SessionContext, request: Request, request_body: Any) -> dict:
        return await json_object(request, request_body, ctx.state.settings.max_body_bytes)

    # --- POST /chat_stream -----------------------------------------------------------------
    async def handle_chat_stream_request(
        self, request: Request, request_body: Any = None, callback: Callback | None = None
    ) -> Response:
        """One chat turn, streamed; `callback(request, message)` fires once when it ends."""
        notify = Notifier(request, callback)
        try:
            ctx = await self._context(request)
            body = await self._body(ctx, request, request_body)
            return await chat_turn(ctx, request, body, notify, self.options)
        except (ClientDisconnected, ClientDisconnect):
            await notify(DISCONNECTED_BEFORE_STREAMING)
            return Response(status_code=CLIENT_GONE)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON answer
            err = as_api_error(exc)
            await notify(f"{UNKNOWN_ERROR},{describe(err)}")  # no-op if the turn already did
            return err.chatstream_response()

    # --- session endpoints -----------------------------------------------------------------
    @_guarded
    async def handle_clear_context_request(self, request: Request) -> Response:
        """Forget the conversation (generation params stay)."""
        return await session_endpoints.clear_context(await self._context(request))

    @_guarded
    async def handle_get_prompt_request(self, request: Request) -> Response:
        """The last prompt the model saw plus its reply, URL-encoded."""
        return await session_endpoints.get_prompt(await self._context(request))

    @_guarded
    async def handle_set_generation_params_request(
        self, request: Request, request_body: Any = None
    ) -> Response:
        """Override temperature, top_k_value, top_p_value (any subset) for this session."""
        ctx = await self._context(request)
        body = await self._body(ctx, request, request_body)
        return await session_endpoints.set_generation_params(ctx, body, self.default_params)

    @_guarded
    async def handle_get_generation_params_request(self, request: Request) -> Response:
        """The defaults merged with this session's overrides."""
        ctx = await self._context(request)
        return await session_endpoints.get_generation_params(ctx, self.default_params)

    @_guarded
    async def handle_set_feedback_request(
        self, request: Request, request_body: Any = None
    ) -> Response:
        """Record a like/dislike on one reply: Redis stream + the app's `on_feedback` hook."""
        ctx = await self._context(request)
        body = await self._body(ctx, request, request_body)
        return await session_endpoints.set_feedback(
            ctx, request, body, self.options.head, self.default_params, self.on_feedback
        )

    # --- cluster endpoints -----------------------------------------------------------------
    @_guarded
    async def handle_get_load_request(self, request: Request) -> Response:
        """Running and waiting generations per worker, cluster-wide."""
        return await cluster_endpoints.get_load(await self.gateway_state())

    @_guarded
    async def handle_get_resource_usage_request(self, request: Request) -> Response:
        """GPU and CPU memory (GB) of every live worker."""
        return await cluster_endpoints.get_resource_usage(await self.gateway_state())
