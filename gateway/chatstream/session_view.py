"""`request.state.session`: ChatStream's session object, read from the Redis session.

ChatStream apps read the conversation in their stream-end callback like this:

```python
def callback_func(request, message):
    session = request.state.session.get_session()
    print(session.get("chat_prompt").create_prompt())
```

Every ChatStream endpoint sets `request.state.session` to a `SessionView`. `get_session()` is
synchronous, as in ChatStream, so it returns a snapshot read from Redis beforehand: before the
callback runs (after the turn was saved, so the callback sees the reply), when roles need the
session, or when the app awaits `request.state.session.load()` itself. The snapshot is
read-only: the cluster writes the session (the turn, /clear_context, /set_generation_params).

The snapshot maps:

- `"chat_prompt"`: a `ChatPromptView` with ChatStream `ChatPrompt`'s history accessors;
- `"generation_params"`: the session's own generation params (what /set_generation_params set);
- `"chat_stream_client_role"`: with `client_roles`, the request's role in ChatStream's shape.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from chatstream_cluster.gateway.sessions.history import Message
from chatstream_cluster.gateway.sessions.store import Session, SessionStore

# ChatStream ChatPrompt methods that change the history: not offered (the view is read-only).
_MUTATORS = frozenset({
    "add_requester_msg", "add_responder_msg", "clear_history", "clear_last_responder_message",
    "remove_last_requester_msg", "remove_last_responder_msg", "set_responder_last_msg",
    "set_responder_last_msg_id", "set_system", "set_requester", "set_responder",
    "build_initial_prompt", "set_tokenizer", "set_prompt_ttl", "set_chat_mode_enabled",
    "set_prefix_as_stop_str_enabled",
})
_READ_ONLY = ("the session snapshot is read-only: the cluster saves the session itself (keep "
              "your own data in your own store, keyed by a RequestHandler's session key or your "
              "user id)")


class RoleType(Enum):
    """Who wrote a message (ChatStream's `RoleType`)."""

    REQUESTER = "requester"
    RESPONDER = "responder"


@dataclass(frozen=True)
class ChatContent:
    """One message of the history (ChatStream's `ChatContent`, read-only)."""

    role: str
    message: str | None
    message_id: str | None
    role_type: RoleType

    def get_role(self) -> str:
        return self.role

    def get_role_type(self) -> RoleType:
        return self.role_type

    def get_message(self) -> str | None:
        return self.message

    def get_message_id(self) -> str | None:
        return self.message_id

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "role_type": self.role_type.name, "message": self.message,
                "message_id": self.message_id, "child_messages": None}


class ChatPromptView:
    """A session's conversation with ChatStream `ChatPrompt`'s accessors.

    `create_prompt()` is the last turn's prompt as the worker rendered it (the model's chat
    template), followed by its reply: what `/get_prompt` returns; "" before the first turn.
    The history holds `user` and `assistant` messages (ChatStream used each model's own role
    prefixes); the app's system prompt is `system`, not part of the history.
    """

    requester = "user"
    responder = "assistant"

    def __init__(self, history: list[Message], prompt: str | None, system: str = "") -> None:
        self._history = [dict(m) for m in history]
        self._prompt = prompt
        self.system = system

    @property
    def history(self) -> list[dict[str, str]]:
        """The messages, oldest first: `{"role", "content"}`, replies also `"id"` (a copy)."""
        return [dict(m) for m in self._history]

    def create_prompt(self, opts: Mapping[str, Any] | None = None) -> str:
        """The rendered prompt of the last turn with its reply.

        `{"omit_last_message": True}`: without the reply (what the model was given).
        `{"to_message_id": id}`: the same as no option when `id` is the last reply (or no
        message of the session); an earlier reply raises ValueError, since only the last
        turn's rendering is kept.
        """
        opts = opts or {}
        prompt = self._prompt or ""
        to_id = opts.get("to_message_id")
        if to_id is not None:
            ids = [m.get("id") for m in self._history if m["role"] == "assistant"]
            if to_id in ids and to_id != ids[-1]:
                raise ValueError("only the last turn's rendered prompt is kept; use "
                                 "get_contents({'to_message_id': ...}) for the messages up to "
                                 "an earlier reply")
        if opts.get("omit_last_message") and self._history:
            last = self._history[-1]
            if last["role"] == "assistant" and last["content"] and prompt.endswith(last["content"]):
                prompt = prompt[: -len(last["content"])]
        return prompt

    def get_contents(self, opts: Mapping[str, Any] | None = None) -> list[ChatContent]:
        """The history as ChatContent; `omit_last_message` blanks the last one's text,
        `to_message_id` stops at (and includes) that message."""
        opts = opts or {}
        to_id = opts.get("to_message_id")
        contents = []
        for i, msg in enumerate(self._history):
            content = _content(msg)
            if opts.get("omit_last_message") and i == len(self._history) - 1:
                content = ChatContent(content.role, None, None, content.role_type)
            contents.append(content)
            if to_id is not None and msg.get("id") == to_id:
                break
        return contents

    def find_chat_content_by_message_id(self, message_id: str) -> ChatContent | None:
        for msg in self._history:
            if msg.get("id") is not None and msg.get("id") == message_id:
                return _content(msg)
        return None

    def get_turn(self) -> int:
        """The number of user messages (a turn is a message and its reply)."""
        return sum(1 for m in self._history if m["role"] == "user")

    def is_empty(self) -> bool:
        return not self._history

    def get_requester_last_msg(self) -> str | None:
        return next((m["content"] for m in reversed(self._history) if m["role"] == "user"), None)

    def get_responder_last_msg(self) -> str | None:
        return next((m["content"] for m in reversed(self._history)
                     if m["role"] == "assistant"), None)

    def __getattr__(self, name: str) -> Any:
        if name in _MUTATORS:
            raise AttributeError(
                f"ChatPromptView.{name}: the session's history is read-only here; the cluster "
                "saves each turn itself (see docs/migration.md, 'request.state.session')")
        raise AttributeError(f"'ChatPromptView' object has no attribute {name!r}")


class SessionSnapshot(Mapping[str, Any]):
    """ChatStream's session dict, read-only, as Redis held it when it was loaded."""

    def __init__(self, session: Session, system: str = "",
                 client_role: dict[str, Any] | None = None) -> None:
        self.session_id = session.sid
        self._data: dict[str, Any] = {
            "chat_prompt": ChatPromptView(session.history, session.prompt, system),
            "generation_params": dict(session.overrides),
        }
        if client_role is not None:
            self._data["chat_stream_client_role"] = dict(client_role)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError(_READ_ONLY)

    def __delitem__(self, key: str) -> None:
        raise TypeError(_READ_ONLY)


class SessionView:
    """`request.state.session`: `get_session()` returns the last loaded snapshot.

    `session_key` is the RequestHandler's key of the conversation (None: the sid cookie's)."""

    def __init__(self, store: SessionStore | None, sid: str, system: str = "",
                 session_key: str | None = None) -> None:
        self._store = store
        self.sid = sid
        self.system = system
        self.session_key = session_key
        self.client_role: dict[str, Any] | None = None  # set by the role check
        self.session: Session | None = None
        self._error: str | None = None

    @classmethod
    def unavailable(cls, reason: str) -> SessionView:
        """A view whose session cannot be read (`get_session()` raises, saying why)."""
        view = cls(None, "")
        view._error = reason
        return view

    async def load(self) -> SessionSnapshot:
        """Read the session from Redis now (also slides its TTL)."""
        if self._store is None:
            raise RuntimeError(f"no session to load ({self._error})")
        try:
            self.session = await self._store.load(self.sid)
        except Exception as exc:
            self.session = None  # never serve an older snapshot as the current one
            self._error = f"{type(exc).__name__}: {exc}"
            raise
        self._error = None
        return self.get_session()

    def get_session(self) -> SessionSnapshot:
        """The session as last loaded (ChatStream's `session_mgr.get_session()`)."""
        if self.session is None:
            if self._error:
                raise RuntimeError(f"the session could not be read ({self._error})")
            raise RuntimeError("request.state.session is not loaded yet: await "
                               "request.state.session.load() first (callbacks get it loaded)")
        return SessionSnapshot(self.session, self.system, self.client_role)

    def save_session(self) -> None:
        """A no-op: the cluster saves the session itself (ChatStream's FastSession call)."""


def _content(msg: Message) -> ChatContent:
    role_type = RoleType.REQUESTER if msg["role"] == "user" else RoleType.RESPONDER
    return ChatContent(msg["role"], msg["content"], msg.get("id"), role_type)
