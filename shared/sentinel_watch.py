"""Follow a Sentinel failover at once: listen for `+switch-master` and move connections.

redis-py's Sentinel pool asks the sentinels for the primary only when it opens a connection.
Connections already open stay where they are: to a dead primary they fail (and reconnect); to
a primary that was demoted to a replica (a manual `SENTINEL FAILOVER`, a partition that heals)
reads go on quietly, a subscription keeps hearing only what replication brings, and only a
write is refused (READONLY, which redis-py turns into a reconnect). So each process subscribes
to `+switch-master` on a sentinel and, when its master name switches, moves every connection
of its Sentinel pools (`redis_topology.SENTINEL_POOLS`): idle ones are closed at once, busy
ones are marked and closed when their command returns (closing a busy connection under the
task using it can break that task), so every next use connects to the new primary. This
matters: a forced failover leaves the old primary a primary for up to ~10 s until the
sentinels demote it, and writes that land there meanwhile are lost when it is. `callbacks`
move what no pool owns (the gateway dispatcher's own connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from chatstream_cluster.shared.redis_topology import (
    SENTINEL_POOLS,
    RedisTopology,
    parse_redis_url,
)

log = logging.getLogger("chatstream.redis")

Callback = Callable[[], Awaitable[None] | None]


class SentinelWatch:
    """Calls `callbacks` each time the sentinels switch the primary of `topology.master_name`."""

    def __init__(self, topology: RedisTopology, callbacks: list[Callback]) -> None:
        self.topology = topology
        self.callbacks = callbacks
        self.switches = 0

    async def run(self) -> None:
        """Listen forever, moving to the next sentinel whenever one fails."""
        delay = 0.1
        index = 0
        while True:
            host, port = self.topology.hosts[index % len(self.topology.hosts)]
            index += 1
            client = aioredis.Redis(
                host=host,
                port=port,
                username=self.topology.sentinel_username,
                password=self.topology.sentinel_password,
                socket_connect_timeout=2.0,
                socket_timeout=None,
                ssl=self.topology.ssl,
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe("+switch-master")
                delay = 0.1
                while True:
                    msg = await pubsub.get_message(timeout=5.0)
                    if msg and msg["type"] == "message":
                        await self._on_switch(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any sentinel trouble: try the next one
                log.warning("sentinel watch: reconnecting", extra={"sentinel": f"{host}:{port}",
                                                                   "error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                    await client.aclose()

    async def _on_switch(self, data: bytes) -> None:
        # "<master-name> <old-ip> <old-port> <new-ip> <new-port>"
        parts = data.decode(errors="replace").split()
        if not parts or parts[0] != self.topology.master_name:
            return
        self.switches += 1
        log.warning("sentinel switched the primary: reconnecting",
                    extra={"switch": " ".join(parts)})
        for pool in list(SENTINEL_POOLS):
            if pool.service_name == self.topology.master_name:
                with contextlib.suppress(Exception):
                    await pool.update_active_connections_for_reconnect()
                    await pool.disconnect(inuse_connections=False)
        for callback in self.callbacks:
            try:
                result = callback()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - one failing callback must not stop the others
                log.exception("sentinel switch callback failed")


def sentinel_watch(url: str, callbacks: list[Callback] | None = None) -> SentinelWatch | None:
    """A watch for a `redis+sentinel://` URL; None for any other URL."""
    topology = parse_redis_url(url)
    if topology.kind != "sentinel":
        return None
    return SentinelWatch(topology, list(callbacks or []))
