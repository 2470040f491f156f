"""`request.state.session`: ChatStream's session object over the Redis session (fakeredis)."""

from __future__ import annotations

import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from chatstream_cluster.gateway.chatstream.session_view import (
    ChatPromptView,
    RoleType,
    SessionView,
)
from chatstream_cluster.gateway.sessions.store import Session, SessionStore
from chatstream_cluster.shared.keys import Keys

HISTORY = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello!", "id": "m1"},
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "fine.", "id": "m2"},
]
RENDERED = "<|user|>hi<|assistant|>hello!<|user|>how are you?<|assistant|>"
PROMPT = RENDERED + "fine."  # what the session hash keeps: the rendering + the reply


def view() -> ChatPromptView:
    return ChatPromptView(HISTORY, PROMPT, system="be brief")


def test_create_prompt_is_the_workers_rendering_with_the_reply() -> None:
    chat_prompt = view()
    assert chat_prompt.create_prompt() == PROMPT
    assert chat_prompt.create_prompt({"omit_last_message": True}) == RENDERED
    assert chat_prompt.create_prompt({"to_message_id": "m2"}) == PROMPT
    with pytest.raises(ValueError, match="only the last turn"):
        chat_prompt.create_prompt({"to_message_id": "m1"})
    assert ChatPromptView([], None).create_prompt() == ""


def test_history_accessors_of_chatstreams_chat_prompt() -> None:
    chat_prompt = view()
    contents = chat_prompt.get_contents()
    assert [(c.get_role(), c.get_message(), c.get_message_id()) for c in contents] == [
        ("user", "hi", None), ("assistant", "hello!", "m1"), ("user", "how are you?", None),
        ("assistant", "fine.", "m2")]
    assert [c.get_role_type() for c in contents[:2]] == [RoleType.REQUESTER, RoleType.RESPONDER]
    assert len(chat_prompt.get_contents({"to_message_id": "m1"})) == 2
    assert chat_prompt.get_contents({"omit_last_message": True})[-1].get_message() is None
    assert chat_prompt.find_chat_content_by_message_id("m1").get_message() == "hello!"
    assert chat_prompt.find_chat_content_by_message_id("nope") is None
    assert chat_prompt.get_turn() == 2 and not chat_prompt.is_empty()
    assert chat_prompt.get_requester_last_msg() == "how are you?"
    assert chat_prompt.get_responder_last_msg() == "fine."
    assert chat_prompt.system == "be brief" and chat_prompt.history == HISTORY
    empty = ChatPromptView([], None)
    assert empty.is_empty() and empty.get_turn() == 0 and empty.get_responder_last_msg() is None
    with pytest.raises(AttributeError, match="read-only"):
        chat_prompt.add_requester_msg("sneaky")


async def test_the_view_reads_redis_and_the_snapshot_is_read_only() -> None:
    redis = fakeredis.FakeAsyncRedis()
    store = SessionStore(redis, Keys("t"), ttl_s=60)
    session = Session("a" * 32, epoch="0")
    assert await store.save_turn(session, HISTORY, PROMPT)
    await store.set_params(session.sid, {"temperature": 0.2})
    await store.set_role(session.sid, "dev")

    state = SessionView(store, session.sid, system="be brief")
    with pytest.raises(RuntimeError, match="not loaded yet"):
        state.get_session()
    state.client_role = {"client_role_name": "dev", "allowed_apis": "all",
                         "enable_dev_tool": False}
    snapshot = await state.load()
    assert snapshot.get("chat_prompt").create_prompt() == PROMPT
    assert snapshot["generation_params"] == {"temperature": 0.2}
    assert snapshot["chat_stream_client_role"]["client_role_name"] == "dev"
    assert state.session.role == "dev"
    with pytest.raises(TypeError, match="read-only"):
        snapshot["chat_prompt"] = None
    with pytest.raises(TypeError, match="read-only"):
        del snapshot["generation_params"]
    state.save_session()  # ChatStream apps call it; the cluster saved already

    await redis.aclose()
    # A failed reload never leaves the older snapshot looking current.
    broken = SessionView(SessionStore(_broken(), Keys("t"), 60), session.sid)
    broken.session = state.session
    with pytest.raises(RedisConnectionError):
        await broken.load()
    with pytest.raises(RuntimeError, match="could not be read"):
        broken.get_session()
    unavailable = SessionView.unavailable("Redis is down")
    with pytest.raises(RuntimeError, match="Redis is down"):
        unavailable.get_session()


def _broken() -> fakeredis.FakeAsyncRedis:
    server = fakeredis.FakeServer()
    server.connected = False
    return fakeredis.FakeAsyncRedis(server=server)
