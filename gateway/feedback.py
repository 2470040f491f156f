"""`POST /set_feedback`: a like/dislike (and form data) on one reply of the session.

Each feedback is appended to the Redis stream `Keys.feedback` (one JSON field `data`, capped at
about `FEEDBACK_STREAM_MAXLEN` entries) and handed to the app's hook, if it has one.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from chatstream_cluster.shared.keys import Keys

log = logging.getLogger("chatstream.gateway")

FEEDBACK_STREAM_MAXLEN = 100_000
MAX_FORM_DATA_BYTES = 64 * 1024


class FeedbackRequest(BaseModel):
    """Body of /set_feedback."""

    model_config = ConfigDict(extra="ignore")

    is_like: StrictBool
    message_id: Annotated[str, Field(min_length=1, max_length=128)]
    form_data: dict[str, Any] = Field(default_factory=dict)


@dataclass
class Feedback:
    """One feedback, as the hook receives it and as the stream stores it.

    `messages` is the conversation up to and including the reply (role/content messages, the
    system prompt first if the app has one); `message` is the reply's text; `params` the
    session's generation params at the time of the feedback.
    """

    session_id: str
    message_id: str
    is_like: bool
    message: str
    messages: list[dict[str, str]]
    params: dict[str, Any]
    form_data: dict[str, Any] = field(default_factory=dict)
    created_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))


# hook(request, feedback); may be a coroutine function.
FeedbackHook = Callable[[Any, Feedback], Any]


async def record_feedback(redis: aioredis.Redis, keys: Keys, feedback: Feedback) -> str:
    """Append to the feedback stream; returns the entry id."""
    entry_id = await redis.xadd(
        keys.feedback, {"data": feedback.to_json()},
        maxlen=FEEDBACK_STREAM_MAXLEN, approximate=True,
    )
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def call_hook(hook: Callable[..., Any] | None, *args: Any) -> None:
    """Call a sync or async app hook; its failure is logged, never raised."""
    if hook is None:
        return
    try:
        result = hook(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:  # noqa: BLE001 - the app's code must not break ours
        log.exception("app hook failed", extra={"hook": getattr(hook, "__name__", repr(hook))})
