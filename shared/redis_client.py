"""One asyncio Redis client (and connection pool) per process, from a Redis URL.

`redis://`/`rediss://` is one node; `redis+cluster://` a Redis Cluster and `redis+sentinel://`
a Sentinel-watched primary (shared/redis_topology.py says how each is read).
"""

from __future__ import annotations

import re

import redis.asyncio as aioredis

from chatstream_cluster.shared.redis_topology import make_client, parse_redis_url, tls_defaults

__all__ = ["make_pubsub_redis", "make_redis", "redact_url", "tls_defaults"]


def make_redis(
    url: str, *, max_connections: int = 256, socket_timeout: float = 5.0,
    pool_timeout: float | None = None,
) -> aioredis.Redis:
    """An asyncio client with bounded retries, so a Redis outage fails fast instead of hanging.

    Passwords and TLS come from the URL (`redis://:pw@host:6379/0`, `rediss://...`). For a
    cluster it is a `RedisCluster` (same command API; `max_connections` per node).
    """
    return make_client(
        url, max_connections=max_connections, socket_timeout=socket_timeout, connect_timeout=1.0,
        pool_timeout=pool_timeout,
    )


def make_pubsub_redis(url: str) -> aioredis.Redis:
    """A client for a long-lived pub/sub connection (no read timeout: it waits for messages).

    On a cluster, classic PUBLISH reaches every node, so a SUBSCRIBE anywhere hears it; call
    `await client.initialize()` before `pubsub()` (the cluster client learns its nodes there).
    """
    if parse_redis_url(url).kind == "single":
        return aioredis.Redis.from_url(
            url, socket_timeout=None, socket_connect_timeout=2.0, health_check_interval=10,
            **tls_defaults(url),
        )
    return make_client(url, max_connections=4, socket_timeout=None, connect_timeout=2.0)


def redact_url(url: str) -> str:
    """The Redis URL without its passwords (for messages and logs)."""
    url = re.sub(r"(sentinel_password=)[^&]*", r"\1***", url)
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user + ':***' if ':' in creds else user}@{host}"
