"""`POST /chat_stream`: one turn of a session, streamed in ChatStream's wire format.

The answer is `text/plain; charset=utf-8` where every chunk is the whole reply so far followed
by `<::EOS::>`, with header `X-ChatStream-Last-Generated-Message-Id`. The turn holds the
session's lock, so a second turn of a session while one runs gets 409 at once; its reply is
saved to the session before the body ends, so the next turn (on any gateway) sees it.

A turn names no model: it goes to `--default-model`, or to the one model the cluster knows
(`turn_model`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, field_validator
from starlette.responses import Response

from chatstream_cluster.gateway.auth import api_key_id
from chatstream_cluster.gateway.chatstream.context import SessionContext
from chatstream_cluster.gateway.errors import APIError, redis_unavailable
from chatstream_cluster.gateway.generation import NORMAL_ENDS, Generation, run_generation
from chatstream_cluster.gateway.request_id import client_request_id
from chatstream_cluster.gateway.sessions.history import Message, to_chat, trim_history
from chatstream_cluster.gateway.sessions.params import sampling_for
from chatstream_cluster.gateway.sessions.store import Session
from chatstream_cluster.gateway.sessions.turn import Notifier, SessionTurn
from chatstream_cluster.gateway.state import GatewayState
from chatstream_cluster.gateway.streaming import GenerationResponse

EOS_MARK = "<::EOS::>"
MESSAGE_ID_HEADER = "X-ChatStream-Last-Generated-Message-Id"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ChatStreamRequest(BaseModel):
    """Body of /chat_stream. `regenerate` is true only for JSON `true`, as in ChatStream."""

    model_config = ConfigDict(extra="ignore")

    user_input: str | None = None
    regenerate: Any = False

    @field_validator("regenerate")
    @classmethod
    def _only_true(cls, value: Any) -> bool:
        return value is True


@dataclass(frozen=True)
class ChatOptions:
    """The app's choices for every turn: a system prompt (sent first, never stored or
    trimmed), the history budget in characters, and the default generation params."""

    system_prompt: str
    history_chars: int
    default_params: dict[str, Any]

    @property
    def head(self) -> list[Message]:
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []


async def chat_turn(
    ctx: SessionContext, request: Request, body: dict[str, Any], notify: Notifier,
    options: ChatOptions,
) -> Response:
    """Start one turn and answer with its stream; raises APIError (409, 400, 429, 503, ...)."""
    s = ctx.state.settings
    req = ChatStreamRequest.model_validate(body)
    if not req.regenerate:
        if req.user_input is None:
            raise APIError(400, "'user_input' (a string) is required unless 'regenerate' "
                           "is true", code="missing_user_input", param="user_input")
        # The turn is stored with the session and always kept by the history trim, so the
        # history budget bounds it too: one session's size stays bounded (docs/security.md).
        longest = min(s.max_message_chars, options.history_chars)
        if len(req.user_input) > longest:
            why = " (the session's history budget)" if longest < s.max_message_chars else ""
            raise APIError(400, f"user_input is longer than {longest} characters{why}",
                           code="message_too_long", param="user_input")
    model = await turn_model(ctx.state)
    lock = await ctx.store.lock(ctx.sid)
    if lock is None:
        raise APIError(409, "this session is already generating a reply; wait for it to "
                       "finish (or abort it) and retry", code="session_busy",
                       headers={"Retry-After": "1"})
    try:
        session = await ctx.store.load(ctx.sid, ctx.owner)
        head = options.head
        base = trim_history(head + _turn_messages(session, req), options.history_chars)
        base = base[len(head):]
        gen = Generation(
            ctx.state, to_chat(head + base),
            sampling_for(session.params(options.default_params), s.default_max_tokens),
            model=model, route="chatstream", owner=f"sid:{ctx.sid}",
            request_id=client_request_id(request), return_prompt=True,
        )
        gen.extra_permits = ctx.state.admission.extra_permits(api_key_id(request))
    except BaseException:
        await lock.release()
        raise
    turn = SessionTurn(ctx.store, session, head, base, lock, notify, options.history_chars)
    gen.close_hooks.append(turn.on_close)
    await run_generation(gen, request.receive)
    headers = {**STREAM_HEADERS, MESSAGE_ID_HEADER: turn.message_id,
               "X-Request-ID": gen.request_id}
    response = GenerationResponse(gen, _chunks(gen, turn), "text/plain; charset=utf-8",
                                  headers=headers, errors_in_band=False)
    return ctx.with_cookie(response)


async def turn_model(state: GatewayState) -> str:
    """The model of a ChatStream turn: `--default-model`, else the one model the cluster knows
    (waiting up to `--no-worker-timeout` for a first worker). 503 when it knows several and
    no default is set, or none."""
    model = state.default_model()
    if model is None and not state.workers.known_models:
        await state.workers.wait_for_any(state.settings.no_worker_timeout)
        model = state.default_model()
    if model is not None:
        return model
    known = sorted(state.workers.known_models)
    if not known and not state.workers.redis_ok:
        raise redis_unavailable()
    if not known:
        raise APIError(503, "no worker is available to serve this request; start a worker or "
                       "retry later", code="no_worker", headers={"Retry-After": "5"})
    raise APIError(503, f"this cluster serves several models ({', '.join(known)}) and the "
                   "ChatStream endpoints name none: start the gateways with --default-model",
                   code="default_model_unset")


def _turn_messages(session: Session, req: ChatStreamRequest) -> list[Message]:
    history = session.history  # replies keep their ids, for /set_feedback
    if not req.regenerate:
        return [*history, {"role": "user", "content": req.user_input or ""}]
    if not any(m["role"] == "user" for m in history):
        raise APIError(400, "nothing to regenerate: this session has no message yet; send "
                       "'user_input' first", code="nothing_to_regenerate", param="regenerate")
    return history[:-1] if history[-1]["role"] == "assistant" else history


async def _chunks(gen: Generation, turn: SessionTurn) -> AsyncIterator[bytes]:
    """The reply so far + EOS mark per event; a complete reply is saved before the body ends,
    so a client's next turn (on any gateway) already sees it. A reply that did not end normally
    is not saved as one (the response is then left unfinished: gateway/streaming.py)."""
    text = ""
    async for event in gen.events():
        if event.text:
            text += event.text
            yield (text + EOS_MARK).encode()
    if gen.finish_reason in NORMAL_ENDS:
        await turn.finish(gen, save=True)
