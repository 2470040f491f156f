"""ChatStream 0.3.0's HTTP API, wire-compatible: `POST /chat_stream` and its companion endpoints.

`/chat_stream` answers `text/plain; charset=utf-8` where every chunk is the whole reply so far
followed by `<::EOS::>`, with header `X-ChatStream-Last-Generated-Message-Id`. The conversation
lives in the Redis session named by the signed `sid` cookie (gateway/sessions.py), so any
gateway serves any turn. A second turn of a session while one runs gets 409 at once.

`ChatStreamAPI` implements every endpoint under ChatStream's method names; the router below
serves it for the gateway app, and `gateway.library.ChatStreamCluster` for a user's own app.
Errors are JSON: ChatStream's `success`/`message` plus the gateway's `error` object.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from chatstream_cluster.gateway.admission import limit_permits
from chatstream_cluster.gateway.auth import api_key_id
from chatstream_cluster.gateway.body import read_json
from chatstream_cluster.gateway.disconnect import ClientDisconnected
from chatstream_cluster.gateway.errors import APIError, redis_unavailable, validation_error
from chatstream_cluster.gateway.feedback import (
    MAX_FORM_DATA_BYTES,
    Feedback,
    FeedbackHook,
    FeedbackRequest,
    call_hook,
    record_feedback,
)
from chatstream_cluster.gateway.relay import (
    DISCONNECTED_BEFORE_STREAMING,
    UNKNOWN_ERROR,
    Generation,
)
from chatstream_cluster.gateway.sessions import (
    COOKIE_NAME,
    DEFAULT_PARAMS,
    HISTORY_CHAR_BUDGET,
    CookieSigner,
    GenerationParams,
    Message,
    Notifier,
    Session,
    SessionStore,
    SessionTurn,
    new_sid,
    params_error,
    sampling_for,
    to_chat,
    trim_history,
)
from chatstream_cluster.gateway.state import GatewayState
from chatstream_cluster.gateway.streaming import GenerationResponse
from chatstream_cluster.shared.redis_client import REDIS_ERRORS

log = logging.getLogger("chatstream.gateway")

EOS_MARK = "<::EOS::>"
MESSAGE_ID_HEADER = "X-ChatStream-Last-Generated-Message-Id"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# callback(request, message): ChatStream's stream-end callback; may be a coroutine function.
Callback = Callable[[Request, str], Any]


class ChatStreamRequest(BaseModel):
    """Body of /chat_stream. `regenerate` is true only for JSON `true`, as in ChatStream."""

    model_config = ConfigDict(extra="ignore")

    user_input: str | None = None
    regenerate: Any = False

    @field_validator("regenerate")
    @classmethod
    def _only_true(cls, value: Any) -> bool:
        return value is True


def error_response(exc: APIError) -> JSONResponse:
    """ChatStream's `success`/`message` keys plus the gateway's `error` object."""
    body = {"success": False, "message": exc.message, **exc.body()}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def _as_api_error(exc: Exception, *, log_unexpected: bool = True) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return validation_error(list(exc.errors()))
    if isinstance(exc, (*REDIS_ERRORS, RedisError)):
        return redis_unavailable()
    if log_unexpected:
        log.exception("unexpected error in a ChatStream endpoint")
    return APIError(500, "internal error", code="internal_error")


def _describe(exc: BaseException) -> str:
    """`<code>: <message>` for the callback's `unknown_error_occurred,<detail>`."""
    if isinstance(exc, Exception):
        err = _as_api_error(exc, log_unexpected=False)
        return f"{err.code}: {err.message}" if err.code else err.message
    return type(exc).__name__


def _guarded(method: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Turn the errors of an endpoint method into JSON responses (it may run in a user's app)."""

    @functools.wraps(method)
    async def wrapper(self: ChatStreamAPI, request: Request, *args: Any, **kw: Any) -> Response:
        try:
            return await method(self, request, *args, **kw)
        except (ClientDisconnected, ClientDisconnect):
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON answer
            return error_response(_as_api_error(exc))

    return wrapper


class ChatStreamAPI:
    """ChatStream's endpoints over one gateway state; subclasses say where the state comes from.

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
        self.default_params = {**DEFAULT_PARAMS, **given.model_dump(exclude_none=True)}
        self.system_prompt = system_prompt
        self.on_feedback = on_feedback
        self.history_chars = history_chars
        self._bound: tuple[GatewayState, SessionStore, CookieSigner] | None = None

    async def gateway_state(self) -> GatewayState:
        """The started GatewayState to serve with."""
        raise NotImplementedError

    # --- plumbing --------------------------------------------------------------------------
    async def _context(self, request: Request) -> tuple[GatewayState, SessionStore, str]:
        state = await self.gateway_state()
        if self._bound is None or self._bound[0] is not state:
            s = state.settings
            self._bound = (state, SessionStore(state.redis, state.keys, s.session_ttl),
                           CookieSigner(s.session_secret))
        _, store, signer = self._bound
        sid = signer.verify(request.cookies.get(COOKIE_NAME)) or new_sid()
        return state, store, sid

    def _with_cookie(self, response: Response, state: GatewayState, sid: str) -> Response:
        """Set (and so slide) the signed session cookie."""
        assert self._bound is not None
        response.set_cookie(
            COOKIE_NAME, self._bound[2].sign(sid), max_age=int(state.settings.session_ttl),
            path="/", httponly=True, samesite="lax", secure=state.settings.cookie_secure,
        )
        return response

    async def _body(self, request: Request, request_body: Any, state: GatewayState) -> dict:
        """The JSON object of the request, or the body the app already read (interception)."""
        limit = state.settings.max_body_bytes
        if request_body is None:
            body = await read_json(request, limit)
        elif isinstance(request_body, dict):
            body = request_body
        elif isinstance(request_body, (bytes, bytearray, str)):
            raw = request_body.encode() if isinstance(request_body, str) else bytes(request_body)
            if len(raw) > limit:
                raise APIError(413, f"request body exceeds {limit} bytes", code="body_too_large")
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
        else:
            raise TypeError("request_body must be bytes, str or dict")
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        return body

    def _head(self) -> list[Message]:
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    # --- POST /chat_stream -----------------------------------------------------------------
    async def handle_chat_stream_request(
        self, request: Request, request_body: Any = None, callback: Callback | None = None
    ) -> Response:
        """One chat turn, streamed; `callback(request, message)` fires once when it ends."""
        notify = Notifier(request, callback)
        try:
            return await self._chat_stream(request, request_body, notify)
        except (ClientDisconnected, ClientDisconnect):
            await notify(DISCONNECTED_BEFORE_STREAMING)
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON answer
            err = _as_api_error(exc)
            await notify(f"{UNKNOWN_ERROR},{_describe(err)}")
            return error_response(err)

    async def _chat_stream(
        self, request: Request, request_body: Any, notify: Notifier
    ) -> Response:
        state, store, sid = await self._context(request)
        s = state.settings
        req = ChatStreamRequest.model_validate(await self._body(request, request_body, state))
        if not req.regenerate:
            if req.user_input is None:
                raise APIError(400, "'user_input' (a string) is required unless 'regenerate' "
                               "is true", code="missing_user_input", param="user_input")
            if len(req.user_input) > s.max_message_chars:
                raise APIError(400, f"user_input is longer than {s.max_message_chars} characters",
                               code="message_too_long", param="user_input")
        lock = await store.lock(sid)
        if lock is None:
            raise APIError(409, "this session is already generating a reply; wait for it to "
                           "finish (or abort it) and retry", code="session_busy",
                           headers={"Retry-After": "1"})
        try:
            session = await store.load(sid)
            head = self._head()
            base = self._turn_messages(session, req)
            base = trim_history(head + base, self.history_chars)[len(head):]
            gen = Generation(
                state, to_chat(head + base),
                sampling_for(session.params(self.default_params), s.default_max_tokens),
                route="chatstream", request_id=request.headers.get("x-request-id", ""),
                return_prompt=True,
            )
            gen.extra_permits = limit_permits(state, api_key_id=api_key_id(request), session_id=sid)
        except BaseException:
            await lock.release()
            raise
        turn = SessionTurn(store, session, head, base, lock, notify, self.history_chars)
        gen.close_hooks.append(turn.on_close)
        try:
            await gen.start(request.receive)
        except ClientDisconnected:
            await gen.close(DISCONNECTED_BEFORE_STREAMING)
            raise
        except BaseException as exc:
            turn.detail = _describe(exc)
            await gen.close(UNKNOWN_ERROR)
            raise
        headers = {**STREAM_HEADERS, MESSAGE_ID_HEADER: turn.message_id,
                   "X-Request-ID": gen.request_id}
        response = GenerationResponse(gen, self._chunks(gen, turn), "text/plain; charset=utf-8",
                                      headers=headers)
        return self._with_cookie(response, state, sid)

    @staticmethod
    def _turn_messages(session: Session, req: ChatStreamRequest) -> list[Message]:
        history = session.history  # replies keep their ids, for /set_feedback
        if not req.regenerate:
            return [*history, {"role": "user", "content": req.user_input or ""}]
        if not any(m["role"] == "user" for m in history):
            raise APIError(400, "nothing to regenerate: this session has no message yet; send "
                           "'user_input' first", code="nothing_to_regenerate", param="regenerate")
        return history[:-1] if history[-1]["role"] == "assistant" else history

    @staticmethod
    async def _chunks(gen: Generation, turn: SessionTurn) -> AsyncIterator[bytes]:
        """The reply so far + EOS mark per event; the session is saved before the body ends,
        so a client's next turn (on any gateway) already sees this one."""
        text = ""
        async for event in gen.events():
            if event.text:
                text += event.text
                yield (text + EOS_MARK).encode()
        if gen.finish_reason != "error":
            await turn.finish(gen, save=True)

    # --- session endpoints -----------------------------------------------------------------
    @_guarded
    async def handle_clear_context_request(self, request: Request) -> Response:
        """Forget the conversation (generation params stay)."""
        state, store, sid = await self._context(request)
        await store.clear(sid)
        body = {"success": True, "message": "Context successfully cleared"}
        return self._with_cookie(JSONResponse(body), state, sid)

    @_guarded
    async def handle_get_prompt_request(self, request: Request) -> Response:
        """The last prompt the model saw plus its reply, URL-encoded."""
        state, store, sid = await self._context(request)
        session = await store.load(sid)
        if session.prompt is None:
            body = {"success": True, "message": "no prompt", "prompt": None}
        else:
            body = {"success": True, "message": "success", "prompt": quote(session.prompt)}
        return self._with_cookie(JSONResponse(body), state, sid)

    @_guarded
    async def handle_set_generation_params_request(
        self, request: Request, request_body: Any = None
    ) -> Response:
        """Override temperature, top_k_value, top_p_value (any subset) for this session."""
        state, store, sid = await self._context(request)
        body = await self._body(request, request_body, state)
        try:
            params = GenerationParams.model_validate(body)
        except ValidationError as exc:
            raise params_error(exc) from None
        await store.set_params(sid, {k: getattr(params, k) for k in params.model_fields_set})
        return await self._params_response(state, store, sid)

    async def _params_response(
        self, state: GatewayState, store: SessionStore, sid: str
    ) -> Response:
        """The defaults merged with the session's overrides, ChatStream's shape."""
        session = await store.load(sid)
        body = {"success": True, "message": "success",
                "generation_params": session.params(self.default_params)}
        return self._with_cookie(JSONResponse(body), state, sid)

    @_guarded
    async def handle_get_generation_params_request(self, request: Request) -> Response:
        """The defaults merged with this session's overrides."""
        state, store, sid = await self._context(request)
        return await self._params_response(state, store, sid)

    @_guarded
    async def handle_set_feedback_request(
        self, request: Request, request_body: Any = None
    ) -> Response:
        """Record a like/dislike on one reply: Redis stream + the app's `on_feedback` hook."""
        state, store, sid = await self._context(request)
        req = FeedbackRequest.model_validate(await self._body(request, request_body, state))
        if len(orjson.dumps(req.form_data)) > MAX_FORM_DATA_BYTES:
            raise APIError(413, f"form_data exceeds {MAX_FORM_DATA_BYTES} bytes",
                           code="form_data_too_large", param="form_data")
        session = await store.load(sid)
        index = session.find_reply(req.message_id)
        if index is None:
            raise APIError(404, "this session has no reply with that message_id (it may have "
                           "been cleared or trimmed)", code="message_not_found",
                           param="message_id")
        feedback = Feedback(
            session_id=sid, message_id=req.message_id, is_like=req.is_like,
            message=session.history[index]["content"],
            messages=self._head() + [{"role": m["role"], "content": m["content"]}
                                     for m in session.history[: index + 1]],
            params=session.params(self.default_params), form_data=req.form_data,
        )
        await record_feedback(state.redis, state.keys, feedback)
        await call_hook(self.on_feedback, request, feedback)
        return self._with_cookie(JSONResponse({"success": True, "message": "success"}),
                                 state, sid)

    # --- cluster endpoints -----------------------------------------------------------------
    @_guarded
    async def handle_get_load_request(self, request: Request) -> Response:
        """One entry per live worker; the cluster's single queue is spread over the serving
        workers so that their `waiting` sums to the queue depth."""
        state = await self.gateway_state()
        held, waiting = await state.semaphore.counts()
        depth = waiting + await state.queue.undelivered()
        live = [w for w, _age in await state.registry.live()]
        serving = [w.id for w in live if not w.draining]
        share, extra = divmod(depth, len(serving)) if serving else (0, 0)
        max_queue = state.settings.max_queue
        workers = []
        for w in live:
            rank = serving.index(w.id) if w.id in serving else -1
            workers.append({
                "name": w.id, "processing": w.running,
                "waiting": 0 if rank < 0 else share + (1 if rank < extra else 0),
                "max_processing": w.max_batch, "max_waiting": max_queue,
                "host": w.host, "model": w.model, "device": w.device, "draining": w.draining,
            })
        cluster = {"processing": held, "waiting": depth,
                   "max_processing": state.admission.capacity(), "max_waiting": max_queue,
                   "workers": len(live)}
        return JSONResponse({"success": True, "message": "success",
                             "chatstream_workers": workers, "cluster": cluster})

    @_guarded
    async def handle_get_resource_usage_request(self, request: Request) -> Response:
        """GPU and CPU memory (GB) of every live worker, as the workers last reported it."""
        state = await self.gateway_state()
        usage = [
            {"name": w.id, "host": w.host, "device": w.device, "num_gpus": len(w.gpus),
             "gpus": w.gpus, "cpu": w.cpu}
            for w, _age in await state.registry.live()
        ]
        return JSONResponse({"success": True, "message": "success", "memory_usage": usage})


# --- the gateway app's routes ----------------------------------------------------------------
class _AppChatStream(ChatStreamAPI):
    """ChatStreamAPI over the gateway app's own state (gateway/app.py's lifespan)."""

    def __init__(self, app: Any) -> None:
        super().__init__()
        self.app = app

    async def gateway_state(self) -> GatewayState:
        return self.app.state.gateway


def _api(request: Request) -> ChatStreamAPI:
    """`app.state.chatstream` (set by `ChatStreamCluster.append_apis`), else the app's own."""
    api = getattr(request.app.state, "chatstream", None)
    if api is None:
        api = request.app.state.chatstream = _AppChatStream(request.app)
    return api


def _endpoint(name: str, doc: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await getattr(_api(request), f"handle_{name}_request")(request)

    endpoint.__name__, endpoint.__doc__ = name, doc
    return endpoint


# ChatStream's API names -> (method, path, endpoint); `append_apis` picks from these.
ENDPOINTS: dict[str, tuple[str, str, Callable[[Request], Awaitable[Response]]]] = {
    name: (method, "/" + name, _endpoint(name, doc))
    for name, method, doc in [
        ("chat_stream", "POST", "Stream one chat turn: `{user_input: str, regenerate: bool}`."),
        ("clear_context", "POST", "Forget this session's conversation (params stay)."),
        ("get_prompt", "GET", "The session's last prompt and reply, URL-encoded."),
        ("set_generation_params", "POST",
         "Set temperature (0-1), top_k_value (1-500), top_p_value (0-1) for this session."),
        ("get_generation_params", "GET", "This session's params: defaults merged with overrides."),
        ("set_feedback", "POST", "Like or dislike one reply: `{is_like, message_id, form_data}`."),
        ("get_load", "GET", "Running and waiting generations per worker, cluster-wide."),
        ("get_resource_usage", "GET", "GPU/CPU memory of every live worker."),
    ]
}

router = APIRouter(tags=["chatstream"])
for _method, _path, _endpoint in ENDPOINTS.values():
    router.add_api_route(_path, _endpoint, methods=[_method])
