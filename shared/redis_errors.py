"""The one place that decides what a Redis error means.

Transient: the server is unreachable, slow, loading its data, failing over (`READONLY` from a
demoted primary, `MASTERDOWN`, `CLUSTERDOWN`, `TRYAGAIN`) or out of memory. Callers answer 503
(HTTP) or retry with backoff (background loops). Anything else — a Lua error, `WRONGTYPE`, a
`NOSCRIPT` that survived a reload, a bad argument — is a bug in this code or a corrupted key:
it is never reported as "Redis unreachable"; it propagates, gets logged with its traceback and,
on an HTTP request, a 500.

Use `except TRANSIENT_REDIS_ERRORS:` around Redis calls. It does not include the builtin
`OSError`: redis-py wraps its socket errors in its own ConnectionError, and an `OSError` from
anything else (a client's socket, a file) says nothing about Redis.
"""

from __future__ import annotations

import asyncio

from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: The Redis errors that say "not now" rather than "wrong": retry later, or answer 503.
#: (BusyLoadingError and the authentication errors are ConnectionErrors; MasterDownError is a
#: ClusterDownError.)
TRANSIENT_REDIS_ERRORS: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
    OutOfMemoryError,
)


def is_transient(exc: BaseException) -> bool:
    """True when `exc` is a Redis error worth retrying (see the module docstring)."""
    return isinstance(exc, TRANSIENT_REDIS_ERRORS)


def reraise_if_cancelling() -> None:
    """Inside an `except` for Redis errors in a loop: re-raise a pending cancellation.

    redis-py may turn a cancellation that hits mid-command into a connection error; a loop that
    retries on connection errors would then swallow the cancel and never stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()
