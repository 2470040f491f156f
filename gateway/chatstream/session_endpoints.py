"""The session endpoints besides the chat turn: clear, prompt, generation params, feedback.

Each answers ChatStream's JSON shape (`success`, `message`, ...) and sets the session cookie.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.responses import Response

from chatstream_cluster.gateway.chatstream.context import SessionContext
from chatstream_cluster.gateway.errors import APIError
from chatstream_cluster.gateway.feedback import (
    Feedback,
    FeedbackHook,
    FeedbackRequest,
    call_hook,
    check_form_data,
    record_feedback,
)
from chatstream_cluster.gateway.sessions.history import Message
from chatstream_cluster.gateway.sessions.params import GenerationParams, params_error


async def clear_context(ctx: SessionContext) -> Response:
    """Forget the conversation (generation params stay)."""
    await ctx.store.clear(ctx.sid, ctx.owner)
    body = {"success": True, "message": "Context successfully cleared"}
    return ctx.with_cookie(JSONResponse(body))


async def get_prompt(ctx: SessionContext) -> Response:
    """The last prompt the model saw plus its reply, URL-encoded."""
    session = await ctx.store.load(ctx.sid, ctx.owner)
    if session.prompt is None:
        body = {"success": True, "message": "no prompt", "prompt": None}
    else:
        body = {"success": True, "message": "success", "prompt": quote(session.prompt)}
    return ctx.with_cookie(JSONResponse(body))


async def set_generation_params(
    ctx: SessionContext, body: dict[str, Any], defaults: dict[str, Any]
) -> Response:
    """Override temperature, top_k_value, top_p_value (any subset; null resets one)."""
    try:
        params = GenerationParams.model_validate(body)
    except ValidationError as exc:
        raise params_error(exc) from None
    await ctx.store.set_params(ctx.sid, {k: getattr(params, k) for k in params.model_fields_set},
                               ctx.owner)
    return await get_generation_params(ctx, defaults)


async def get_generation_params(ctx: SessionContext, defaults: dict[str, Any]) -> Response:
    """The defaults merged with the session's overrides, ChatStream's shape."""
    session = await ctx.store.load(ctx.sid, ctx.owner)
    body = {"success": True, "message": "success", "generation_params": session.params(defaults)}
    return ctx.with_cookie(JSONResponse(body))


async def set_feedback(
    ctx: SessionContext, request: Request, body: dict[str, Any], head: list[Message],
    defaults: dict[str, Any], hook: FeedbackHook | None,
) -> Response:
    """Record a like/dislike on one reply: the Redis stream, then the app's hook."""
    s = ctx.state.settings
    req = FeedbackRequest.model_validate(body)
    check_form_data(req.form_data, s.max_feedback_bytes, s.max_feedback_depth)
    session = await ctx.store.load(ctx.sid, ctx.owner)
    index = session.find_reply(req.message_id)
    if index is None:
        raise APIError(404, "this session has no reply with that message_id (it may have "
                       "been cleared or trimmed)", code="message_not_found", param="message_id")
    feedback = Feedback(
        session_id=ctx.sid, message_id=req.message_id, is_like=req.is_like,
        message=session.history[index]["content"],
        messages=head + [{"role": m["role"], "content": m["content"]}
                         for m in session.history[: index + 1]],
        params=session.params(defaults), form_data=req.form_data,
    )
    await record_feedback(ctx.state.redis, ctx.state.keys, feedback, s.feedback_max_entries,
                          s.feedback_retention)
    await call_hook(hook, request, feedback)
    return ctx.with_cookie(JSONResponse({"success": True, "message": "success"}))
