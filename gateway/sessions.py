"""ChatStream sessions in Redis: a signed `sid` cookie, one hash per session, one turn at a time.

The cookie holds `<sid>.<hmac>`: a 128-bit random id and its HMAC-SHA256 under
`session_secret`. A cookie that does not verify starts a fresh session, never an error.

The hash `Keys.session(sid)` has these fields, and slides its TTL on every access:

- `history`: JSON list of `{"role", "content"}` messages (assistant ones carry `"id"`), oldest
  first, without the system prompt, trimmed to `HISTORY_CHAR_BUDGET`;
- `prompt`: the prompt the worker rendered for the last turn, followed by that turn's reply;
- `p:<name>`: the session's generation-parameter overrides (JSON values);
- `epoch`: bumped by /clear_context, so a turn that ends after a clear does not bring the old
  history back; `created_ms`, `updated_ms`, `last_turn_ms`: wall-clock timestamps.

A turn holds `Keys.session_lock(sid)` (SET NX PX with a random token, lease refreshed while it
runs, released by compare-and-delete) so two turns never interleave their history writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError

from chatstream_cluster.gateway.errors import APIError, validation_error
from chatstream_cluster.gateway.feedback import call_hook
from chatstream_cluster.gateway.relay import DISCONNECTED_WHILE_STREAMING, SUCCESS, UNKNOWN_ERROR
from chatstream_cluster.shared.keys import Keys, safe_id
from chatstream_cluster.shared.redis_client import REDIS_ERRORS
from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams

if TYPE_CHECKING:
    from chatstream_cluster.gateway.relay import Generation

log = logging.getLogger("chatstream.gateway")

COOKIE_NAME = "sid"
SID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
# Proposed settings (module constants until GatewaySettings grows them):
HISTORY_CHAR_BUDGET = 24_000  # most characters of history sent with a turn (system prompt incl.)
MESSAGE_OVERHEAD_CHARS = 16  # what a chat template adds around one message, roughly
LOCK_LEASE_S = 30.0  # a turn's lock expires this long after its gateway stops refreshing it
MAX_TURN_S = 3600.0  # a lock is never refreshed past this (a leaked turn frees its session)

# ChatStream's defaults (its constructor: temperature=1.0, top_k=50, top_p=1.0).
DEFAULT_PARAMS: dict[str, float | int] = {"temperature": 1.0, "top_k_value": 50, "top_p_value": 1.0}

Message = dict[str, str]


def new_sid() -> str:
    """A fresh session id: 128 random bits as 32 hex digits."""
    return secrets.token_hex(16)


class CookieSigner:
    """Signs session ids for the `sid` cookie and verifies them in constant time."""

    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def _mac(self, sid: str) -> str:
        return hmac.new(self._key, sid.encode(), hashlib.sha256).hexdigest()

    def sign(self, sid: str) -> str:
        return f"{sid}.{self._mac(sid)}"

    def verify(self, value: str | None) -> str | None:
        """The session id of a genuine cookie value; None for anything else."""
        if not value or len(value) > 128:
            return None
        sid, _, mac = value.partition(".")
        if not SID_PATTERN.match(sid):
            return None
        if not hmac.compare_digest(self._mac(sid).encode(), mac.encode()):
            return None
        return safe_id(sid)


class GenerationParams(BaseModel):
    """Body of /set_generation_params: any subset; null resets a field to its default."""

    model_config = ConfigDict(extra="forbid")

    temperature: Annotated[float, Field(strict=True, ge=0.0, le=1.0)] | None = None
    top_k_value: Annotated[int, Field(strict=True, ge=1, le=500)] | None = None
    top_p_value: Annotated[float, Field(strict=True, ge=0.0, le=1.0)] | None = None


PARAM_RANGES = {"temperature": "0.0 to 1.0", "top_k_value": "1 to 500", "top_p_value": "0.0 to 1.0"}


def params_error(exc: ValidationError) -> APIError:
    """A 400 that names the bad or unknown generation param."""
    first = exc.errors()[0]
    name = str(first["loc"][0]) if first.get("loc") else None
    if name not in PARAM_RANGES:
        if first.get("type") == "extra_forbidden":
            known = ", ".join(PARAM_RANGES)
            return APIError(400, f"unknown generation param {name!r}; known: {known}",
                            code="unknown_param", param=name)
        return validation_error(list(exc.errors()))
    return APIError(400, f"Invalid {name} value. {name} should be from {PARAM_RANGES[name]}.",
                    code="invalid_value", param=name)


def sampling_for(params: dict[str, Any], max_tokens: int) -> SamplingParams:
    """SamplingParams from ChatStream's (merged) generation params."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(params["temperature"]),
        top_k=int(params["top_k_value"]),
        top_p=max(float(params["top_p_value"]), 1e-6),  # top_p 0 means "most likely token only"
    )


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


@dataclass
class Session:
    """What one session hash held when it was loaded."""

    sid: str
    history: list[Message] = field(default_factory=list)
    prompt: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    epoch: str = "0"
    created_ms: int = 0
    updated_ms: int = 0

    def params(self, defaults: dict[str, Any] = DEFAULT_PARAMS) -> dict[str, Any]:
        """The defaults merged with this session's overrides."""
        return {**defaults, **self.overrides}

    def find_reply(self, message_id: str) -> int | None:
        """Index of the assistant message with this id, if the history still has it."""
        for i, msg in enumerate(self.history):
            if msg.get("id") == message_id and msg["role"] == "assistant":
                return i
        return None


# KEYS: session hash. ARGV: epoch, history json, prompt, now ms, ttl ms.
_SAVE_TURN = """
local epoch = redis.call('HGET', KEYS[1], 'epoch') or '0'
if epoch ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'history', ARGV[2], 'prompt', ARGV[3], 'updated_ms', ARGV[4],
           'last_turn_ms', ARGV[4])
redis.call('HSETNX', KEYS[1], 'created_ms', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS: session hash. ARGV: now ms, ttl ms.
_CLEAR = """
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HDEL', KEYS[1], 'history', 'prompt')
redis.call('HSET', KEYS[1], 'updated_ms', ARGV[1])
redis.call('HSETNX', KEYS[1], 'created_ms', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lock. ARGV: token[, lease ms]. Only the holder may refresh or delete its lock.
_LOCK_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_LOCK_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class SessionLock:
    """The lock of one running turn; its lease is refreshed until `release()`."""

    def __init__(self, store: SessionStore, sid: str, token: str) -> None:
        self.store = store
        self.key = store.keys.session_lock(sid)
        self.token = token
        self._released = False
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        lease_ms = int(self.store.lock_lease_s * 1000)
        deadline = time.monotonic() + MAX_TURN_S
        while time.monotonic() < deadline:
            await asyncio.sleep(self.store.lock_lease_s / 3)
            try:
                if not await self.store._lock_refresh(keys=[self.key], args=[self.token, lease_ms]):
                    return  # lost (expired and taken): nothing left to refresh
            except (*REDIS_ERRORS, RedisError) as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError() from None  # redis-py may mask a cancel
                log.warning("session lock refresh failed", extra={"error": str(exc)})

    async def release(self) -> None:
        """Give the lock back if this turn still holds it (idempotent)."""
        if self._released:
            return
        self._released = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        try:
            await self.store._lock_release(keys=[self.key], args=[self.token])
        except (*REDIS_ERRORS, RedisError) as exc:
            log.warning("session lock release failed; it expires", extra={"error": str(exc)})


class SessionStore:
    """Load and change sessions; every access slides the session's TTL."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, ttl_s: float, lock_lease_s: float = LOCK_LEASE_S
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.lock_lease_s = lock_lease_s
        self._save_turn = redis.register_script(_SAVE_TURN)
        self._clear = redis.register_script(_CLEAR)
        self._lock_refresh = redis.register_script(_LOCK_REFRESH)
        self._lock_release = redis.register_script(_LOCK_RELEASE)

    async def load(self, sid: str) -> Session:
        """The session's contents (empty for a new or expired one)."""
        key = self.keys.session(sid)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(key)
            pipe.pexpire(key, self.ttl_ms)
            raw, _ = await pipe.execute()
        fields = {k.decode(): v for k, v in raw.items()}
        session = Session(sid)
        if b := fields.get("history"):
            session.history = orjson.loads(b)
        if b := fields.get("prompt"):
            session.prompt = b.decode()
        session.epoch = fields.get("epoch", b"0").decode()
        session.created_ms = int(fields.get("created_ms", b"0"))
        session.updated_ms = int(fields.get("updated_ms", b"0"))
        for name in DEFAULT_PARAMS:
            if (b := fields.get("p:" + name)) is not None:
                session.overrides[name] = orjson.loads(b)
        return session

    async def save_turn(self, session: Session, history: list[Message], prompt: str) -> bool:
        """Store a finished turn; False when the session was cleared while it ran."""
        saved = await self._save_turn(
            keys=[self.keys.session(session.sid)],
            args=[session.epoch, orjson.dumps(history), prompt, _now_ms(), self.ttl_ms],
        )
        return bool(saved)

    async def clear(self, sid: str) -> None:
        """Forget the history and prompt (the generation params stay)."""
        await self._clear(keys=[self.keys.session(sid)], args=[_now_ms(), self.ttl_ms])

    async def set_params(self, sid: str, changes: dict[str, Any]) -> None:
        """Apply overrides; a None value removes the override."""
        key = self.keys.session(sid)
        now = _now_ms()
        async with self.redis.pipeline(transaction=True) as pipe:
            for name, value in changes.items():
                if value is None:
                    pipe.hdel(key, "p:" + name)
                else:
                    pipe.hset(key, "p:" + name, orjson.dumps(value))
            pipe.hset(key, "updated_ms", now)
            pipe.hsetnx(key, "created_ms", now)
            pipe.pexpire(key, self.ttl_ms)
            await pipe.execute()

    async def lock(self, sid: str) -> SessionLock | None:
        """Take the session's turn lock; None while another turn holds it."""
        token = secrets.token_hex(16)
        acquired = await self.redis.set(
            self.keys.session_lock(sid), token, nx=True, px=int(self.lock_lease_s * 1000)
        )
        return SessionLock(self, sid, token) if acquired else None


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
        self.detail = ""  # why the turn failed before it started, for the callback
        self._finishing: asyncio.Task | None = None

    async def finish(self, gen: Generation, save: bool) -> None:
        """Save the reply (if `save`) and release the lock; the first call wins, and it
        completes even if the caller is cancelled."""
        if self._finishing is None:
            self._finishing = asyncio.get_running_loop().create_task(self._finish(gen, save))
        await asyncio.shield(self._finishing)

    async def _finish(self, gen: Generation, save: bool) -> None:
        try:
            if save:
                reply = {"role": "assistant", "content": gen.text, "id": self.message_id}
                kept = trim_history([*self.head, *self.base, reply], self.history_chars)
                prompt = gen.prompt
                if prompt is None:  # a job continued on another worker returns none
                    prompt = _plain_render(self.head + self.base)
                if not await self.store.save_turn(
                    self.session, kept[len(self.head):], prompt + gen.text
                ):
                    log.info("session cleared during the turn: reply not saved",
                             extra=gen.log_ctx)
        except (*REDIS_ERRORS, RedisError) as exc:
            log.warning("could not save the session", extra={**gen.log_ctx, "error": str(exc)})
        finally:
            await self.lock.release()

    async def on_close(self, gen: Generation, status: str) -> None:
        """Generation close hook: save or not, release, then the callback with the status."""
        save = status == SUCCESS or (status == DISCONNECTED_WHILE_STREAMING and bool(gen.text))
        await self.finish(gen, save)
        message = status
        if status == UNKNOWN_ERROR:
            err = gen.error
            detail = f"{err.code}: {err.message}" if err else self.detail or "generation failed"
            message = f"{status},{detail}"
        await self.notify(message)


def _plain_render(messages: list[Message]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def _now_ms() -> int:
    return int(time.time() * 1000)
