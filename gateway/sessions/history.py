"""A session's history: role/content messages, trimmed oldest-first to a character budget."""

from __future__ import annotations

from chatstream_cluster.shared.schemas import ChatMessage

HISTORY_CHAR_BUDGET = 24_000  # most characters of history sent with a turn (system prompt incl.)
MESSAGE_OVERHEAD_CHARS = 16  # what a chat template adds around one message, roughly

Message = dict[str, str]


def rendered_chars(messages: list[Message]) -> int:
    """Roughly how long `messages` are once a chat template renders them."""
    return sum(len(m["content"]) + len(m["role"]) + MESSAGE_OVERHEAD_CHARS for m in messages)


def trim_history(messages: list[Message], budget: int, reserved: int = 0) -> list[Message]:
    """Drop the oldest turns until the messages fit `budget - reserved` characters.

    A leading system message and the last turn (the last user message and what follows it)
    always stay; a turn leaves whole, so the history never starts with an orphan reply.
    """
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    limit = budget - reserved - rendered_chars(head)
    size = rendered_chars(body)
    last_turn = max((i for i, m in enumerate(body) if m["role"] == "user"), default=len(body) - 1)
    start = 0
    while size > limit and start < last_turn:
        size -= rendered_chars(body[start:start + 1])
        start += 1
        while start < last_turn and body[start]["role"] != "user":
            size -= rendered_chars(body[start:start + 1])
            start += 1
    return head + body[start:]


def to_chat(messages: list[Message]) -> list[ChatMessage]:
    return [ChatMessage(role=m["role"], content=m["content"]) for m in messages]




def plain_render(messages: list[Message]) -> str:
    """A template-free rendering, for a turn whose worker returned no prompt."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
