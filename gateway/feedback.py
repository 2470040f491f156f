"""`POST /set_feedback`: a like/dislike (and form data) on one reply of the session.

Each feedback is appended to the Redis stream `Keys.feedback` (one JSON field `data`) and handed
to the app's hook, if it has one. The stream keeps about `--feedback-max-entries` entries and
none older than `--feedback-retention` (XADD MAXLEN ~, then XTRIM MINID ~): export it before
(`chatstream feedback`, or XRANGE) or keep the hook's copy. `form_data` is the only free-form
part a client sends: it is capped at `--max-feedback-bytes` of JSON (413) and
`--max-feedback-depth` levels of nesting (400), checked before anything encodes it.
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

from chatstream_cluster.gateway.errors import APIError
from chatstream_cluster.shared.keys import Keys

log = logging.getLogger("chatstream.gateway")


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


def nesting_depth(value: Any, limit: int) -> int:
    """How deeply `value` (parsed JSON) nests arrays and objects, counted up to `limit + 1`
    (iterative: a deep value must not exhaust Python's stack or orjson's)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            if depth > limit:
                return depth
            deepest = max(deepest, depth)
            stack.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def check_form_data(form_data: dict[str, Any], max_bytes: int, max_depth: int) -> None:
    """400 when `form_data` nests deeper than `max_depth`, 413 when its JSON exceeds
    `max_bytes`."""
    if nesting_depth(form_data, max_depth) > max_depth:
        raise APIError(400, f"form_data nests deeper than {max_depth} levels",
                       code="form_data_too_deep", param="form_data")
    if len(orjson.dumps(form_data)) > max_bytes:
        raise APIError(413, f"form_data exceeds {max_bytes} bytes",
                       code="form_data_too_large", param="form_data")


async def record_feedback(
    redis: aioredis.Redis, keys: Keys, feedback: Feedback, max_entries: int, retention_s: float,
) -> str:
    """Append to the feedback stream, trimmed to about `max_entries` entries none older than
    `retention_s`; returns the entry id."""
    oldest_ms = max(0, feedback.created_ms - int(retention_s * 1000))
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xadd(keys.feedback, {"data": feedback.to_json()}, maxlen=max_entries,
                  approximate=True)
        pipe.xtrim(keys.feedback, minid=f"{oldest_ms}-0", approximate=False)
        entry_id, _ = await pipe.execute()
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
