"""One asyncio Redis connection pool per process, from a redis:// or rediss:// URL."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from chatstream_cluster.shared.redis_reads import lag_tolerant


def make_redis(
    url: str, *, max_connections: int = 256, socket_timeout: float = 5.0,
    pool_timeout: float | None = None,
) -> aioredis.Redis:
    """An asyncio client with bounded retries, so a Redis outage fails fast instead of hanging.

    Passwords and TLS come from the URL (`redis://:pw@host:6379/0`, `rediss://...`).
    """
    # A blocking pool: a burst of more than `max_connections` calls waits for a free
    # connection (up to `pool_timeout`, default `socket_timeout`) instead of failing with "Too
    # many connections".
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout if pool_timeout is None else pool_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=1.0,
        health_check_interval=15,
        # A broken pooled connection (Redis restarted) is worth one retry; a timeout is not:
        # a Redis that did not answer in `socket_timeout` will not answer the retry either, and
        # the retry would double how long a request waits before its 503. (Retry's default
        # `supported_errors` include TimeoutError, and `retry_on_error` only adds to them.)
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1,
                    supported_errors=(RedisConnectionError,)),
        retry_on_error=[RedisConnectionError],
    )
    # A short socket_timeout must not fail calls whose reply a busy event loop read late.
    pool.connection_class = lag_tolerant(pool.connection_class)
    client = aioredis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client


def make_pubsub_redis(url: str) -> aioredis.Redis:
    """A client for a long-lived pub/sub connection (no read timeout: it waits for messages)."""
    return aioredis.Redis.from_url(
        url, socket_timeout=None, socket_connect_timeout=2.0, health_check_interval=10
    )


def redact_url(url: str) -> str:
    """The Redis URL without its password (for messages and logs)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user + ':***' if ':' in creds else user}@{host}"
