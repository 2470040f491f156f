"""Which Redis a URL names, one node, a Redis Cluster or a Sentinel-watched primary, and the
redis-py clients for it.

- `redis://`, `rediss://`, `unix://`: one node, exactly as redis-py's `from_url` reads it.
- `redis+cluster://[user:password@]host:port,host:port,...` (`rediss+cluster://` for TLS):
  a Redis Cluster; the hosts are seeds, list several so a client can start while one is down.
  `--redis-cluster` turns a plain `redis://host:port` into the same.
- `redis+sentinel://[user:password@]host:port,.../master-name[/db]` (`rediss+sentinel://`):
  the primary that the sentinels at those addresses watch under `master-name`. The password is
  the primary's; `?sentinel_password=` (and `sentinel_username=`) authenticate to sentinels.

Query options of the `+cluster` and `+sentinel` forms: `ssl_ca_certs`, `ssl_certfile`,
`ssl_keyfile`, `ssl_cert_reqs`; and for Sentinel, `wait_replicas` / `wait_timeout_ms`, the
WAIT that follows the writes a failover must not lose (see `shared/replica_wait.py`).
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatstream_cluster.shared.redis_reads import lag_tolerant
from chatstream_cluster.shared.replica_wait import ReplicaWait

Kind = Literal["single", "cluster", "sentinel"]
SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
DEFAULT_PORT = {"cluster": 6379, "sentinel": 26379}
SSL_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
SENTINEL_WAIT_REPLICAS = 1
SENTINEL_WAIT_TIMEOUT_MS = 100


class RedisURLError(ValueError):
    """A Redis URL this project cannot use."""


@dataclass(frozen=True)
class RedisTopology:
    """A parsed Redis URL. For `single`, `url` goes to redis-py unchanged."""

    kind: Kind
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    db: int = 0
    master_name: str = ""
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ssl_options: dict[str, str] = field(default_factory=dict)
    wait_replicas: int = 0
    wait_timeout_ms: int = SENTINEL_WAIT_TIMEOUT_MS

    def auth(self) -> dict[str, Any]:
        """Credentials and TLS options for a connection to a data node."""
        out: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.ssl:
            out["ssl"] = True
            out.update(self.ssl_options)
        return out


def parse_redis_url(url: str) -> RedisTopology:
    """Read `url` (see the module docstring); raises RedisURLError for a malformed one."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise RedisURLError(f"not a URL: {url!r}")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        return RedisTopology("single", url)
    kind, ssl = SCHEMES[scheme]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    creds, at, host_list = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = creds.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    hosts = tuple(_host_port(h, DEFAULT_PORT[kind]) for h in host_list.split(",") if h)
    if not hosts:
        raise RedisURLError(f"no host in {scheme}:// URL")
    options = dict(parse_qsl(query))
    unknown = set(options) - {*SSL_OPTIONS, "sentinel_username", "sentinel_password",
                              "wait_replicas", "wait_timeout_ms"}
    if unknown:
        raise RedisURLError(f"unknown option(s) in the Redis URL: {', '.join(sorted(unknown))}")
    ssl_options = {k: v for k, v in options.items() if k in SSL_OPTIONS}
    parts = [p for p in path.split("/") if p]
    topo: dict[str, Any] = {}
    if kind == "sentinel":
        if not parts:
            raise RedisURLError("redis+sentinel:// needs the master name: .../<master-name>")
        topo["master_name"] = unquote(parts[0])
        topo["db"] = _int(parts[1], "database") if len(parts) > 1 else 0
        topo["sentinel_username"] = options.get("sentinel_username")
        topo["sentinel_password"] = options.get("sentinel_password")
        topo["wait_replicas"] = _int(options.get("wait_replicas", SENTINEL_WAIT_REPLICAS), "wait")
        topo["wait_timeout_ms"] = _int(
            options.get("wait_timeout_ms", SENTINEL_WAIT_TIMEOUT_MS), "wait_timeout_ms"
        )
    elif parts and parts != ["0"]:
        raise RedisURLError("a Redis Cluster has only database 0")
    return RedisTopology(
        kind, url, hosts, username, password, ssl, ssl_options=ssl_options, **topo
    )


def as_cluster_url(url: str) -> str:
    """`redis://host:port` as `redis+cluster://host:port` (what `--redis-cluster` means)."""
    scheme, sep, rest = url.partition("://")
    if scheme.lower() in ("redis+cluster", "rediss+cluster"):
        return url
    if scheme.lower() not in ("redis", "rediss"):
        raise RedisURLError(f"--redis-cluster needs a redis:// or rediss:// URL, not {scheme}://")
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    return f"{scheme.lower()}+cluster{sep}{netloc}"


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [::1]:7000
        host, _, port = text[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    return host, _int(port, "port") if port else default_port


def _int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RedisURLError(f"bad {what} in the Redis URL: {value!r}") from None


# --- clients ---------------------------------------------------------------------------------


class PrimaryConnection(SentinelManagedConnection):
    """A connection to the Sentinel primary that asks where the primary is on every connect.

    redis-py asks the sentinels only in `connect()`; a command retried after its connection
    dropped reconnects through `connect_check_health()` to the address it had, which after a
    failover is the old primary."""

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not self.is_connected and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )

    async def _connect_retry(self) -> None:
        if self.connection_pool.is_master:  # the address is asked in connect_check_health
            await self.connect_check_health(
                check_health=self.connection_pool.check_connection, retry_socket_connect=False
            )
        else:
            await super()._connect_retry()


class PrimarySSLConnection(PrimaryConnection, SSLConnection):
    pass


class BlockingSentinelConnectionPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """redis-py's Sentinel pool (connections find the primary through the sentinels) that
    waits for a free connection instead of failing, like the single-node pool."""


# Every Sentinel pool of this process, so a failover can move all of their connections at
# once (shared/sentinel_watch.py).
SENTINEL_POOLS: weakref.WeakSet[SentinelConnectionPool] = weakref.WeakSet()


class NewestConfigSentinel(Sentinel):
    """Asks every sentinel for the primary and believes the newest configuration (the highest
    config-epoch). redis-py's own `discover_master` takes the first valid answer; right after a
    failover a sentinel that has not heard of it yet still names the old primary, which after a
    forced failover stays a primary for seconds, so writes would land where they are lost.

    Concurrent lookups share one round of questions: a burst of new connections (hundreds of
    requests arriving at once) would otherwise open hundreds of sentinel connections, past the
    sentinel clients' pool limit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lookups: dict[str, asyncio.Future[tuple[str, int]]] = {}

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        lookup = self._lookups.get(service_name)
        if lookup is None:
            lookup = asyncio.ensure_future(self._ask_all(service_name))
            self._lookups[service_name] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop(service_name, None))
        return await asyncio.shield(lookup)

    async def _ask_all(self, service_name: str) -> tuple[str, int]:
        async def ask(sentinel: aioredis.Redis) -> dict[str, Any] | None:
            try:
                return (await sentinel.sentinel_masters()).get(service_name)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                return None

        best: dict[str, Any] | None = None
        for state in await asyncio.gather(*(ask(s) for s in self.sentinels)):
            if state and self.check_master_state(state, service_name):
                if best is None or state.get("config-epoch", 0) > best.get("config-epoch", 0):
                    best = state
        if best is None:
            raise MasterNotFoundError(f"No master found for {service_name!r}")
        return best["ip"], best["port"]


def tls_defaults(url: str) -> dict[str, Any]:
    """For a rediss:// URL: verify the server's certificate and host name, whatever the
    installed redis-py's own defaults are.

    A query parameter of the URL still wins (redis-py's `from_url` lets the URL override
    keyword arguments): `?ssl_cert_reqs=none` turns verification off, and then no host name
    is checked either, `?ssl_check_hostname=false` only the host name check."""
    scheme, _, _, query, _ = urlsplit(url)
    if "rediss" not in scheme.lower().split("+"):
        return {}
    cert_reqs = parse_qs(query).get("ssl_cert_reqs", ["required"])[-1]
    return {"ssl_cert_reqs": "required", "ssl_check_hostname": cert_reqs.lower() != "none"}


def _retry() -> Retry:
    # A broken pooled connection (Redis restarted) is worth one retry; a timeout is not: a
    # Redis that did not answer in `socket_timeout` will not answer the retry either, and the
    # retry would double how long a request waits for its 503 (Retry's default
    # `supported_errors` include TimeoutError; `retry_on_error` only adds to them).
    return Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1,
                 supported_errors=(RedisConnectionError,))


def _sentinel(
    topo: RedisTopology, timeout: float | None, connect_timeout: float
) -> NewestConfigSentinel:
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": connect_timeout if timeout is None else timeout,
        "socket_connect_timeout": connect_timeout,
        "username": topo.sentinel_username,
        "password": topo.sentinel_password,
    }
    if topo.ssl:
        sentinel_kwargs |= {"ssl": True, **topo.ssl_options}
    return NewestConfigSentinel(list(topo.hosts), sentinel_kwargs=sentinel_kwargs)


def make_client(
    url: str, *, max_connections: int, socket_timeout: float | None, connect_timeout: float,
    pool_timeout: float | None = None,
) -> aioredis.Redis | RedisCluster:
    """An asyncio client for `url`: pooled, bounded retries, failing fast when Redis is down."""
    topo = parse_redis_url(url)
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "health_check_interval": 15,
        "retry": _retry(),
        "retry_on_error": [RedisConnectionError],
        **tls_defaults(url),
    }
    if topo.kind == "single":
        # A blocking pool: a burst of more than `max_connections` calls waits for a free
        # connection (up to `pool_timeout`, default the socket timeout) instead of failing with
        # "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections,
            timeout=socket_timeout if pool_timeout is None else pool_timeout, **common
        )
        # A short socket_timeout must not fail calls whose reply a busy event loop read late.
        pool.connection_class = lag_tolerant(pool.connection_class)
        client = aioredis.Redis(connection_pool=pool)
        client.auto_close_connection_pool = True
        return client
    if topo.kind == "cluster":
        common.pop("retry_on_error")
        # A cluster client retries MOVED/ASK/failover errors itself, refreshing its slot map;
        # a few tries with a short backoff ride out a manual failover.
        common["retry"] = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3)
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in topo.hosts],
            max_connections=max_connections,
            **common,
            **topo.auth(),
        )
    common.pop("ssl_cert_reqs", None)  # the sentinel connection classes take TLS from the URL
    common.pop("ssl_check_hostname", None)
    client = _sentinel(topo, socket_timeout, connect_timeout).master_for(
        topo.master_name,
        redis_class=aioredis.Redis,
        connection_pool_class=BlockingSentinelConnectionPool,
        connection_class=PrimarySSLConnection if topo.ssl else PrimaryConnection,
        max_connections=max_connections,
        timeout=socket_timeout,
        db=topo.db,
        **common,
        **topo.auth(),
    )
    client.auto_close_connection_pool = True
    SENTINEL_POOLS.add(client.connection_pool)
    if topo.wait_replicas > 0:
        ReplicaWait(topo.wait_replicas, topo.wait_timeout_ms).attach(client)
    return client


def make_pubsub_pool(url: str, connect_timeout: float) -> aioredis.ConnectionPool:
    """A pool whose `make_connection()` opens a pub/sub connection (no read timeout) to the one
    node, or to the current Sentinel primary. Not for a cluster (one connection per shard:
    gateway/sharded_dispatcher.py)."""
    topo = parse_redis_url(url)
    if topo.kind == "single":
        return aioredis.ConnectionPool.from_url(
            url, socket_timeout=None, socket_connect_timeout=connect_timeout,
            **tls_defaults(url),
        )
    if topo.kind == "sentinel":
        sentinel = _sentinel(topo, None, connect_timeout)
        pool = SentinelConnectionPool(
            topo.master_name,
            sentinel,
            connection_class=PrimarySSLConnection if topo.ssl else PrimaryConnection,
            socket_timeout=None,
            socket_connect_timeout=connect_timeout,
            db=topo.db,
            **topo.auth(),
        )
        SENTINEL_POOLS.add(pool)
        return pool
    raise RedisURLError("a cluster has no single pub/sub connection")


def is_cluster(client: Any) -> bool:
    """True for a Redis Cluster client (scripts and transactions must stay within one slot)."""
    return isinstance(client, RedisCluster)


def sync_client(url: str, timeout: float) -> redis.Redis | redis.RedisCluster:
    """A synchronous client for one-off checks (the gateway's start-up check)."""
    topo = parse_redis_url(url)
    kwargs = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
    if topo.kind == "single":
        return redis.Redis.from_url(url, **kwargs, **tls_defaults(url))
    if topo.kind == "cluster":
        from redis.cluster import ClusterNode as SyncClusterNode  # noqa: PLC0415

        return redis.RedisCluster(
            startup_nodes=[SyncClusterNode(h, p) for h, p in topo.hosts], **kwargs, **topo.auth()
        )
    from redis.sentinel import Sentinel as SyncSentinel  # noqa: PLC0415

    sentinel_kwargs = {**kwargs, "password": topo.sentinel_password,
                       "username": topo.sentinel_username}
    return SyncSentinel(list(topo.hosts), sentinel_kwargs=sentinel_kwargs).master_for(
        topo.master_name, db=topo.db, **kwargs, **topo.auth()
    )
