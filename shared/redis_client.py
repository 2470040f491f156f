"""One asyncio Redis connection pool per process, from a redis:// or rediss:// URL."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def make_redis(
    url: str, *, max_connections: int = 256, socket_timeout: float = 5.0
) -> aioredis.Redis:
    """An asyncio client with bounded retries, so a Redis outage fails fast instead of hanging.

    Passwords and TLS come from the URL (`redis://:pw@host:6379/0`, `rediss://...`).
    """
    # A blocking pool: a burst of more than `max_connections` calls waits for a free
    # connection (up to `socket_timeout`) instead of failing with "Too many connections".
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=1.0,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        **tls_defaults(url),
    )
    client = aioredis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client


def make_pubsub_redis(url: str) -> aioredis.Redis:
    """A client for a long-lived pub/sub connection (no read timeout: it waits for messages)."""
    return aioredis.Redis.from_url(
        url, socket_timeout=None, socket_connect_timeout=2.0, health_check_interval=10,
        **tls_defaults(url),
    )


def tls_defaults(url: str) -> dict[str, Any]:
    """For a rediss:// URL: verify the server's certificate and host name, whatever the
    installed redis-py's own defaults are (it checks host names by default only from 6.0).

    A query parameter of the URL still wins (redis-py's `from_url` lets the URL override
    keyword arguments): `?ssl_cert_reqs=none` turns verification off, and then no host name
    is checked either (5.x would refuse that combination), `?ssl_check_hostname=false` only
    the host name check."""
    scheme, _, _, query, _ = urlsplit(url)
    if "rediss" not in scheme.lower().split("+"):
        return {}
    cert_reqs = parse_qs(query).get("ssl_cert_reqs", ["required"])[-1]
    return {"ssl_cert_reqs": "required", "ssl_check_hostname": cert_reqs.lower() != "none"}


def redact_url(url: str) -> str:
    """The Redis URL without its password (for messages and logs)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user + ':***' if ':' in creds else user}@{host}"
