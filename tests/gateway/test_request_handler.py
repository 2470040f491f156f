"""The RequestHandler contract: which session a request gets, and the history it restores."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest

from chatstream_cluster.gateway.chatstream.context import SessionContext
from chatstream_cluster.gateway.chatstream.handlers import (
    RequestHandler,
    keyed_context,
    keyed_sid,
    restore_history,
)
from chatstream_cluster.gateway.sessions.cookies import SID_PATTERN, CookieSigner
from chatstream_cluster.gateway.sessions.store import SessionStore
from chatstream_cluster.shared.keys import Keys


class SyncHandler(RequestHandler):
    """Plain (not async) hooks work too."""

    def __init__(self, key: Any, stored: Any = None) -> None:
        self.key, self.stored, self.loads = key, stored, 0

    def session_key(self, request: Any) -> Any:  # type: ignore[override]
        return self.key

    def load_history(self, request: Any, key: str) -> Any:  # type: ignore[override]
        self.loads += 1
        return self.stored


def context() -> SessionContext:
    store = SessionStore(fakeredis.FakeAsyncRedis(), Keys("t"), ttl_s=60)
    return SessionContext(None, store, CookieSigner("s"), "c" * 32)  # type: ignore[arg-type]


async def test_the_key_names_a_session_without_a_cookie() -> None:
    ctx = context()
    same, key = await keyed_context(SyncHandler(None), ctx, None)  # type: ignore[arg-type]
    assert same is ctx and key is None  # no key: the cookie's session
    keyed, key = await keyed_context(SyncHandler("alice"), ctx, None)  # type: ignore[arg-type]
    assert key == "alice" and keyed.sid == keyed_sid("alice") != ctx.sid
    assert SID_PATTERN.match(keyed.sid) and keyed.set_cookie is False and ctx.set_cookie
    assert keyed_sid("alice") != keyed_sid("bob")
    for bad in ("", 42, "x" * 513):
        with pytest.raises(TypeError, match="session_key must return None or a string"):
            await keyed_context(SyncHandler(bad), ctx, None)  # type: ignore[arg-type]


async def test_history_is_restored_only_into_a_session_without_one() -> None:
    ctx = context()
    stored = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    handler = SyncHandler("alice", stored)
    await restore_history(handler, ctx, None, "alice")  # type: ignore[arg-type]
    history = (await ctx.store.load(ctx.sid)).history
    assert [m["content"] for m in history] == ["hi", "hello"]
    assert history[1]["id"]  # replies get an id, for /set_feedback
    await restore_history(handler, ctx, None, "alice")  # type: ignore[arg-type]
    assert handler.loads == 1  # Redis has it now: the handler is not asked again
    assert await ctx.store.has_history(ctx.sid)

    empty = context()
    await restore_history(SyncHandler("bob", None), empty, None, "bob")  # type: ignore[arg-type]
    assert not await empty.store.has_history(empty.sid)  # None: nothing stored


@pytest.mark.parametrize("bad", [
    {"role": "user"}, [{"role": "system", "content": "x"}], [{"role": "user", "content": 3}],
    ["hi"],
])
async def test_a_bad_stored_history_is_a_clear_error(bad: Any) -> None:
    ctx = context()
    with pytest.raises(TypeError, match="load_history"):
        await restore_history(SyncHandler("a", bad), ctx, None, "a")  # type: ignore[arg-type]
    assert not await ctx.store.has_history(ctx.sid)
