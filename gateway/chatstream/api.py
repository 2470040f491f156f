"""`ChatStreamAPI`: every ChatStream endpoint under ChatStream's method name, with one error path.

Subclasses say where the gateway state comes from: the gateway app's own state
(gateway/routes/chatstream.py) or a user's app (`ChatStreamCluster`, gateway/library.py).
Every failure becomes a JSON answer with ChatStream's `success`/`message` keys plus the
gateway's `error` object; nothing raises into the user's app.

Every endpoint starts the same way (`_context`): the session (the cookie's, or the one a
`RequestHandler` names), `request.state.session` (session_view.py), then the `client_roles`
check (access.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from chatstream_cluster.gateway.chatstream import cluster_endpoints, handlers, session_endpoints
from chatstream_cluster.gateway.chatstream.access import (
    AccessControl,
    RoleDenied,
    promotion_response,
)
from chatstream_cluster.gateway.chatstream.chat import ChatOptions, chat_turn
from chatstream_cluster.gateway.chatstream.context import (
    SessionBinding,
    SessionContext,
    json_object,
)
from chatstream_cluster.gateway.chatstream.roles import ClientRoles
from chatstream_cluster.gateway.chatstream.session_view import SessionView
from chatstream_cluster.gateway.disconnect import ClientDisconnected
from chatstream_cluster.gateway.errors import as_api_error, describe
from chatstream_cluster.gateway.feedback import Feedback, FeedbackHook, call_hook
from chatstream_cluster.gateway.generation import (
    DISCONNECTED_BEFORE_STREAMING,
    DISCONNECTED_WHILE_STREAMING,
    SUCCESS,
    UNKNOWN_ERROR,
)
from chatstream_cluster.gateway.sessions.history import HISTORY_CHAR_BUDGET
from chatstream_cluster.gateway.sessions.params import DEFAULT_PARAMS, GenerationParams
from chatstream_cluster.gateway.sessions.turn import Notifier
from chatstream_cluster.gateway.state import GatewayState

log = logging.getLogger("chatstream.gateway")

# callback(request, message): ChatStream's stream-end callback; may be a coroutine function.
Callback = Callable[[Request, str], Any]
CLIENT_GONE = 499  # nginx's "client closed request": nobody reads this answer
SAVED_STATUSES = (SUCCESS, DISCONNECTED_WHILE_STREAMING)  # a turn that may have been saved


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
    `default_params` (temperature, top_k_value, top_p_value) replace ChatStream's defaults;
    `client_roles` is ChatStream's role definition (roles.py; None: no role layer);
    `request_handler` a `RequestHandler` (handlers.py).
    """

    def __init__(
        self,
        *,
        system_prompt: str = "",
        on_feedback: FeedbackHook | None = None,
        history_chars: int = HISTORY_CHAR_BUDGET,
        default_params: dict[str, Any] | None = None,
        client_roles: Mapping[str, Any] | ClientRoles | None = None,
        request_handler: Any = None,
    ) -> None:
        given = GenerationParams.model_validate(default_params or {})
        self.options = ChatOptions(
            system_prompt=system_prompt, history_chars=history_chars,
            default_params={**DEFAULT_PARAMS, **given.model_dump(exclude_none=True)},
        )
        self.on_feedback = on_feedback
        self._sessions = SessionBinding()
        if client_roles is not None and not isinstance(client_roles, ClientRoles):
            client_roles = ClientRoles(client_roles)
        self.access = AccessControl(client_roles) if client_roles is not None else None
        self.request_handler = handlers.check_request_handler(request_handler)

    @property
    def default_params(self) -> dict[str, Any]:
        return self.options.default_params

    async def gateway_state(self) -> GatewayState:
        """The started GatewayState to serve with."""
        raise NotImplementedError

    async def _context(self, request: Request, api_name: str) -> SessionContext:
        """The request's session, `request.state.session`, and the role check for `api_name`
        (raises RoleDenied)."""
        ctx = self._sessions.context(await self.gateway_state(), request)
        key = None
        if self.request_handler is not None:
            ctx, key = await handlers.keyed_context(self.request_handler, ctx, request)
        view = request.state.session = SessionView(ctx.store, ctx.sid,
                                                   self.options.system_prompt, key)
        if self.access is not None:
            await self.access.check(request, view, api_name)
        return ctx

    async def verify_role_for_api(self, request: Request, api_name: str) -> Response | None:
        """ChatStream's role check, awaited here: None when the request's role may call
        `api_name` (any ChatStream API name, e.g. `webui_index`), else the 403 to return."""
        if self.access is None:
            return None
        try:
            await self._context(request, api_name)
        except RoleDenied as exc:
            return exc.chatstream_response()
        return None

    async def _body(self, ctx: SessionContext, request: Request, request_body: Any) -> dict:
        return await json_object(request, request_body, ctx.state.settings.max_body_bytes)

    # --- POST /chat_stream -----------------------------------------------------------------
    async def handle_chat_stream_request(
        self, request: Request, request_body: Any = None, callback: Callback | None = None
    ) -> Response:
        """One chat turn, streamed; `callback(request, message)` fires once when it ends, with
        `request.state.session` loaded as the turn left it."""
        notify = Notifier(request, self._at_stream_end(callback))
        try:
            ctx = await self._context(request, "chat_stream")
            body = await self._body(ctx, request, request_body)
            view: SessionView = request.state.session
            if self.access is not None:
                role = await self.access.promote(request, ctx.store, view, body.get("user_input"))
                if role is not None:  # a pass phrase: never sent to the model nor stored
                    return ctx.with_cookie(promotion_response(role, notify))
            if self.request_handler is not None and view.session_key is not None:
                await handlers.restore_history(self.request_handler, ctx, request,
                                               view.session_key)
            return await chat_turn(ctx, request, body, notify, self.options)
        except (ClientDisconnected, ClientDisconnect):
            await notify(DISCONNECTED_BEFORE_STREAMING)
            return Response(status_code=CLIENT_GONE)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON answer
            err = as_api_error(exc)
            await notify(f"{UNKNOWN_ERROR},{describe(err)}")  # no-op if the turn already did
            return err.chatstream_response()

    def _at_stream_end(self, callback: Callback | None) -> Callback | None:
        """The app's callback, run after `request.state.session` is reloaded (the turn is
        saved by then) and the request handler got the history."""
        if callback is None and self.request_handler is None:
            return None  # nobody reads the session at the end: no Redis round trip

        async def at_stream_end(request: Request, message: str) -> None:
            view = getattr(request.state, "session", None)
            if not isinstance(view, SessionView):
                view = request.state.session = SessionView.unavailable("the request failed "
                                                                      "before its session")
            try:
                await view.load()
            except Exception as exc:  # noqa: BLE001 - the callback still fires
                log.warning("could not reload the session for the callback",
                            extra={"error": str(exc)})
            else:
                handler = self.request_handler
                saved = message.split(",", 1)[0] in SAVED_STATUSES
                if handler is not None and view.session_key is not None and saved:
                    await handlers.save_history(handler, request, view.session_key,
                                                view.get_session()["chat_prompt"].history)
            await call_hook(callback, request, message)

        return at_stream_end

    # --- session endpoints -----------------------------------------------------------------
    @_guarded
    async def handle_clear_context_request(
        self, request: Request, request_body: Any = None, callback: Any = None
    ) -> Response:
        """Forget the conversation (generation params and the promoted role stay).
        `request_body` and `callback` are ChatStream's parameters, unused there as here."""
        ctx = await self._context(request, "clear_context")
        response = await session_endpoints.clear_context(ctx)
        key = request.state.session.session_key
        if self.request_handler is not None and key is not None:
            await handlers.save_history(self.request_handler, request, key, [])
        return response

    @_guarded
    async def handle_get_prompt_request(self, request: Request) -> Response:
        """The last prompt the model saw plus its reply, URL-encoded."""
        return await session_endpoints.get_prompt(await self._context(request, "get_prompt"))

    @_guarded
    async def handle_set_generation_params_request(
        self, request: Request, request_body: Any = None
    ) -> Response:
        """Override temperature, top_k_value, top_p_value (any subset) for this session."""
        ctx = await self._context(request, "set_generation_params")
        body = await self._body(ctx, request, request_body)
        return await session_endpoints.set_generation_params(ctx, body, self.default_params)

    @_guarded
    async def handle_get_generation_params_request(self, request: Request) -> Response:
        """The defaults merged with this session's overrides."""
        ctx = await self._context(request, "get_generation_params")
        return await session_endpoints.get_generation_params(ctx, self.default_params)

    @_guarded
    async def handle_set_feedback_request(
        self, request: Request, request_body: Any = None, opts: dict[str, Any] | None = None
    ) -> Response:
        """Record a like/dislike on one reply: Redis stream + the app's `on_feedback` hook.
        ChatStream's `opts={"on_feedback_received": f}` (also as the second argument) calls
        `f(feedback_data)` with ChatStream's dict too."""
        if isinstance(request_body, dict) and "on_feedback_received" in request_body:
            request_body, opts = None, request_body  # ChatStream's (request, opts) call
        ctx = await self._context(request, "set_feedback")
        body = await self._body(ctx, request, request_body)
        hook = self.on_feedback
        if opts and opts.get("on_feedback_received") is not None:
            hook = _with_chatstream_feedback(hook, opts["on_feedback_received"])
        return await session_endpoints.set_feedback(
            ctx, request, body, self.options.head, self.default_params, hook
        )

    # --- cluster endpoints -----------------------------------------------------------------
    @_guarded
    async def handle_get_load_request(self, request: Request) -> Response:
        """Running and waiting generations per worker, cluster-wide."""
        ctx = await self._context(request, "get_load")
        return await cluster_endpoints.get_load(ctx.state)

    @_guarded
    async def handle_get_resource_usage_request(self, request: Request) -> Response:
        """GPU and CPU memory (GB) of every live worker."""
        ctx = await self._context(request, "get_resource_usage")
        return await cluster_endpoints.get_resource_usage(ctx.state)


def _with_chatstream_feedback(
    hook: FeedbackHook | None, received: Callable[..., Any]
) -> FeedbackHook:
    """`hook`, then ChatStream's `on_feedback_received(feedback_data)` with its dict."""

    async def both(request: Request, feedback: Feedback) -> None:
        await call_hook(hook, request, feedback)
        prompt = None
        try:
            snapshot = await request.state.session.load()
            prompt = snapshot["chat_prompt"].create_prompt({"to_message_id": feedback.message_id})
        except ValueError:
            pass  # an earlier reply: only the last turn's rendered prompt is kept
        await call_hook(received, {
            "is_like": feedback.is_like, "form_data": feedback.form_data, "prompt": prompt,
            "target_message_id": feedback.message_id, "target_message": feedback.message,
            "generation_params": feedback.params,
        })

    return both
