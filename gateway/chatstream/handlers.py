"""Custom request handlers: where a conversation's history is kept, ChatStream's
`AbstractRequestHandler` reshaped for a cluster.

ChatStream's handler ran the whole turn (`process_request`) next to the model. Here the turn runs
in the gateway and the model in the workers, so a handler says only *which* conversation a
request belongs to and *where else* its history is kept; Redis stays the working copy that every
gateway shares:

```python
from chatstream_cluster import ChatStreamCluster, RequestHandler

class HistoryPerUser(RequestHandler):
    async def session_key(self, request):
        return request.headers.get("x-user-id")       # your login; None = the sid cookie

    async def load_history(self, request, key):
        return await db.histories.find_one(key)       # None when there is none

    async def save_history(self, request, key, history):
        await db.histories.replace_one(key, history)

chat_stream = ChatStreamCluster(request_handler=HistoryPerUser())
```

The async contract (plain functions work too; each runs on the event loop, so never block):

- `session_key(request)` runs at the start of every ChatStream endpoint call. A string names the
  conversation: the same key reaches the same session from any browser and any gateway, and no
  `sid` cookie is set for it (so logging out ends access). None falls back to the cookie.
- `load_history(request, key)` runs when a /chat_stream turn finds no history in Redis (a new
  or expired session): return `[{"role": "user"|"assistant", "content": str}, ...]`, oldest
  first, or None. It becomes the session's history before the turn is generated. A failure
  fails the turn (500, callback `unknown_error_occurred`).
- `save_history(request, key, history)` runs after a turn ended and was saved (before the app's
  callback), with the history as Redis holds it, and after /clear_context with `[]`. A failure
  is logged; the turn is already saved in Redis.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import uuid
from typing import Any

from fastapi import Request

from chatstream_cluster.gateway.chatstream.context import SessionContext
from chatstream_cluster.gateway.sessions.history import Message

log = logging.getLogger("chatstream.gateway")

MAX_KEY_CHARS = 512


class RequestHandler:
    """Subclass and override any of the three hooks (the defaults keep the cookie session)."""

    async def session_key(self, request: Request) -> str | None:
        """The conversation this request belongs to (e.g. the logged-in user's id), or None."""
        return None

    async def load_history(self, request: Request, key: str) -> list[dict[str, Any]] | None:
        """The stored history of conversation `key`, or None."""
        return None

    async def save_history(self, request: Request, key: str, history: list[dict[str, Any]]) -> None:
        """Keep conversation `key`'s history (replies carry their message `id`)."""
        return None


def check_request_handler(handler: Any) -> RequestHandler | None:
    """The handler to use; None for none or ChatStream's default. TypeError names the fix."""
    if handler is None or type(handler).__name__ == "SimpleSessionRequestHandler":
        return None  # ChatStream's default: the cookie session, which is built in here
    if isinstance(handler, RequestHandler):
        return handler
    hint = ("ChatStream's request handlers run the model themselves (process_request); "
            if hasattr(handler, "process_request") else "")
    raise TypeError(f"request_handler: {hint}subclass chatstream_cluster.RequestHandler "
                    "(session_key, load_history, save_history) instead; see docs/migration.md")


def keyed_sid(key: str) -> str:
    """The session id of a handler's conversation key (never one a cookie names at random)."""
    return hashlib.sha256(b"request_handler\0" + key.encode()).hexdigest()[:32]


async def call(method: Any, *args: Any) -> Any:
    """Call a handler hook that may be sync or async."""
    result = method(*args)
    return await result if inspect.isawaitable(result) else result


async def keyed_context(
    handler: RequestHandler, ctx: SessionContext, request: Request
) -> tuple[SessionContext, str | None]:
    """The request's session context under the handler's key (and the key), or as it was."""
    key = await call(handler.session_key, request)
    if key is None:
        return ctx, None
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
        raise TypeError(f"RequestHandler.session_key must return None or a string of 1 to "
                        f"{MAX_KEY_CHARS} characters, not {key!r:.80}")
    return dataclasses.replace(ctx, sid=keyed_sid(key), set_cookie=False), key


async def restore_history(
    handler: RequestHandler, ctx: SessionContext, request: Request, key: str
) -> None:
    """Before a turn: give a session without history the handler's stored one."""
    if await ctx.store.has_history(ctx.sid):
        return
    loaded = await call(handler.load_history, request, key)
    if loaded is None:
        return
    if await ctx.store.seed_history(ctx.sid, _checked_history(loaded)):
        log.info("history restored by the request handler", extra={"messages": len(loaded)})


async def save_history(
    handler: RequestHandler, request: Request, key: str, history: list[Message]
) -> None:
    """Hand the history to the handler; its failure is logged, not raised."""
    try:
        await call(handler.save_history, request, key, [dict(m) for m in history])
    except Exception:  # noqa: BLE001 - the app's code must not break the turn
        log.exception("RequestHandler.save_history failed")


def _checked_history(value: Any) -> list[Message]:
    if not isinstance(value, list):
        raise TypeError("RequestHandler.load_history must return a list of messages or None")
    history: list[Message] = []
    for msg in value:
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ("user", "assistant") or not isinstance(msg.get("content"), str):
            raise TypeError("RequestHandler.load_history: each message must be "
                            "{'role': 'user' or 'assistant', 'content': str}, not "
                            f"{msg!r:.80}")
        kept: Message = {"role": role, "content": msg["content"]}
        if role == "assistant":  # replies need an id for /set_feedback
            kept["id"] = str(msg.get("id") or uuid.uuid4())
        history.append(kept)
    return history
