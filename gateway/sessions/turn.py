"""One /chat_stream turn of a session: save its reply once, release the lock, notify the app."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chatstream_cluster.gateway.feedback import call_hook
from chatstream_cluster.gateway.generation import (
    DISCONNECTED_WHILE_STREAMING,
    SUCCESS,
    UNKNOWN_ERROR,
)
from chatstream_cluster.gateway.sessions.history import Message, plain_render, trim_history
from chatstream_cluster.gateway.sessions.store import Session, SessionLock, SessionStore
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS

if TYPE_CHECKING:
    from chatstream_cluster.gateway.generation import Generation

log = logging.getLogger("chatstream.gateway")


class Notifier:
    """Calls the app's `callback(request, message)` once per request (sync or async)."""

    def __init__(self, request: Any, callback: Callable[[Any, str], Any] | None) -> None:
        self.request = request
        self.callback = callback
        self.sent = False

    async def __call__(self, message: str) -> None:
        if not self.sent:
            self.sent = True
            await call_hook(self.callback, self.request, message)


class SessionTurn:
    """One /chat_stream turn of a session: save its reply once, release the lock, notify.

    Like ChatStream, a reply cut short by a client disconnect is kept (the text streamed so
    far); a failed turn leaves the history as it was.
    """

    def __init__(
        self, store: SessionStore, session: Session, head: list[Message], base: list[Message],
        lock: SessionLock, notify: Notifier, history_chars: int,
    ) -> None:
        self.store = store
        self.session = session
        self.head = head  # the system prompt, if any: sent, never stored
        self.base = base  # the history the turn was generated from, its user message last
        self.lock = lock
        self.notify = notify
        self.history_chars = history_chars
        self.message_id = str(uuid.uuid4())
        self._finishing: asyncio.Task | None = None

    async def finish(self, gen: Generation, save: bool, *, truncated: bool = False) -> None:
        """Save the reply (if `save`; a `truncated` one is marked so) and release the lock; the
        first call wins, and it completes even if the caller is cancelled."""
        if self._finishing is None:
            self._finishing = asyncio.get_running_loop().create_task(
                self._finish(gen, save, truncated)
            )
        await asyncio.shield(self._finishing)

    async def _finish(self, gen: Generation, save: bool, truncated: bool) -> None:
        try:
            if save:
                reply: Message = {"role": "assistant", "content": gen.text, "id": self.message_id}
                if truncated:
                    reply["truncated"] = "true"
                kept = trim_history([*self.head, *self.base, reply], self.history_chars)
                prompt = gen.prompt
                if prompt is None:  # a job continued on another worker returns none
                    prompt = plain_render(self.head + self.base)
                if not await self.store.save_turn(
                    self.session, kept[len(self.head):], prompt + gen.text
                ):
                    log.info("session cleared during the turn: reply not saved",
                             extra=gen.log_ctx)
        except TRANSIENT_REDIS_ERRORS as exc:
            log.warning("could not save the session", extra={**gen.log_ctx, "error": str(exc)})
        finally:
            await self.lock.release()

    async def on_close(self, gen: Generation, status: str) -> None:
        """Generation close hook: save or not, release, then the callback with the status
        (`unknown_error_occurred,<code>: <message>` when it failed).

        A complete reply is saved. A reply the user stopped (the client disconnected while it
        streamed) is kept as ChatStream keeps it, marked `"truncated"` in the history — never
        as a complete turn; a failed one leaves the history as it was."""
        kind = status.split(",", 1)[0]
        stopped = kind == DISCONNECTED_WHILE_STREAMING and bool(gen.text)
        await self.finish(gen, kind == SUCCESS or stopped, truncated=stopped)
        if status == UNKNOWN_ERROR:
            err = gen.error
            status += f",{err.code}: {err.message}" if err else ",generation failed"
        await self.notify(status)
