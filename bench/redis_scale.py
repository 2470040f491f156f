"""Scenario `scale`: what one Redis node carries of the project's own event path, and what a
3-primary Redis Cluster carries, in the same run.

Each side gets fresh servers without persistence: one node (`RedisServer`), or a cluster of 3
primaries without replicas (`LocalRedisCluster`). Then, for `seconds`:

- `publishers` worker-like processes run `EventWriter.publish` (the fenced Lua: attempt check,
  XADD to the job's event stream, PUBLISH, or SPUBLISH on a cluster) in rounds of one event per
  job for their share of `jobs` jobs, pipelined, as fast as they can (~100-byte events);
- this process holds the gateway side with the real dispatcher (`Dispatcher` on one node,
  `ShardedDispatcher` on the cluster: one SSUBSCRIBE per job, confirmed) and counts deliveries.

Rounds alternate between the two sides (both sets of servers run throughout) and each row
gives the medians. Reported per side: events written per second (acknowledged by Redis) and
delivered per second, the servers' CPU time per event (psutil on the server processes: the
cost that decides how many events one core of Redis carries), the streams that rate sustains
at one event per 20 ms (the worker's default `--stream-interval`), and on the cluster the cost
of a job's SSUBSCRIBE (`register()`: 200 jobs one at a time, then all jobs at once).

On a 2-core machine the publishers, the dispatcher and every Redis process share the same two
cores, so the cluster cannot be faster here; the CPU-per-event figure is what carries over to a
machine with a core per shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from chatstream_cluster.shared.procs import die_with_parent
from tests.cluster import ROOT

STREAM_INTERVAL_S = 0.02
TEXT = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incid "


@contextmanager
def _servers(kind: str):  # noqa: ANN202
    """(url, server pids) of fresh servers of `kind`."""
    from chatstream_cluster.shared.redis_local import LocalRedisCluster
    from chatstream_cluster.shared.redis_server import RedisServer

    with tempfile.TemporaryDirectory() as tmp:
        if kind == "single":
            server = RedisServer(Path(tmp) / "redis", appendonly=False).start()
            try:
                yield server.url, [server.process.pid]
            finally:
                server.stop()
        else:
            nodes = LocalRedisCluster(Path(tmp) / "cluster", primaries=3, replicas=0).start()
            try:
                yield nodes.url, [s.process.pid for s in nodes.servers]
            finally:
                nodes.stop()


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


async def _gateway_side(url: str, prefix: str, jobs: list[str]) -> tuple[Any, dict[str, Any]]:
    """The real dispatcher (and its running task) with every job registered; returns them
    and the subscribe timings."""
    from chatstream_cluster.gateway.dispatcher import Dispatcher
    from chatstream_cluster.gateway.sharded_dispatcher import ShardedDispatcher
    from chatstream_cluster.shared.keys import Keys
    from chatstream_cluster.shared.redis_client import make_redis
    from chatstream_cluster.shared.redis_topology import is_cluster

    keys = Keys(prefix)
    redis = make_redis(url)
    timings: dict[str, Any] = {}
    if is_cluster(redis):
        dispatcher: Any = ShardedDispatcher(redis, keys, "bench")
    else:
        dispatcher = Dispatcher(url, keys, "bench")
    runner = asyncio.create_task(dispatcher.run(), name="bench-dispatcher")
    assert await dispatcher.wait_connected(10), "the dispatcher did not connect"
    if is_cluster(redis):
        probe = [f"probe{i}" for i in range(200)]
        started = time.perf_counter()
        inboxes = [await dispatcher.register(job) for job in probe]  # what a request pays
        timings["subscribe_one_us"] = round((time.perf_counter() - started) / len(probe) * 1e6)
        for job, inbox in zip(probe, inboxes, strict=True):
            dispatcher.unregister(job, inbox)
        started = time.perf_counter()
        await asyncio.gather(*(dispatcher.register(job) for job in jobs))  # a burst
        timings["subscribe_burst_us_per_job"] = round(
            (time.perf_counter() - started) / len(jobs) * 1e6, 1
        )
    else:
        for job in jobs:
            await dispatcher.register(job)
    async with redis.pipeline(transaction=False) as pipe:
        for job in jobs:
            pipe.hset(keys.job_meta(job), "attempt", 1)
        await pipe.execute()
    if not is_cluster(redis):  # the cluster's dispatcher keeps using it for the slot map
        await redis.aclose()
    return (dispatcher, runner), timings


async def _measure(kind: str, url: str, pids: list[int], *, jobs: int, publishers: int,
                   seconds: float, run: int) -> dict[str, Any]:
    prefix = f"scale{os.getpid()}{kind[0]}{run}"
    job_ids = [f"{kind[0]}job{i:05d}" for i in range(jobs)]
    (dispatcher, runner), timings = await _gateway_side(url, prefix, job_ids)
    delivered = 0

    async def count() -> None:
        nonlocal delivered
        while True:
            for inbox in dispatcher.inboxes.values():
                delivered += len(inbox.events)
                inbox.events.clear()
            await asyncio.sleep(0.05)

    counter = asyncio.create_task(count())
    share = [job_ids[i::publishers] for i in range(publishers)]
    cpu_before = _cpu_seconds(pids)
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.redis_scale", "publish", url, prefix, ",".join(part),
            str(seconds), cwd=ROOT, stdout=subprocess.PIPE, preexec_fn=die_with_parent,
        )
        for part in share
    ]
    outputs = await asyncio.gather(*(p.communicate() for p in procs))
    cpu = _cpu_seconds(pids) - cpu_before
    await asyncio.sleep(0.5)  # let the last deliveries arrive
    counter.cancel()
    for inbox in dispatcher.inboxes.values():
        delivered += len(inbox.events)
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    await dispatcher.stop()
    if hasattr(dispatcher, "cluster"):
        await dispatcher.cluster.aclose()
    results = [json.loads(out[0]) for out in outputs]
    written = sum(r["events"] for r in results)
    wall = max(r["seconds"] for r in results)
    per_s = written / wall
    return {
        "scenario": "scale",
        "redis": "1 node" if kind == "single" else "3-primary cluster",
        "jobs": jobs,
        "publishers": publishers,
        "events_per_s": round(per_s),
        "delivered_per_s": round(delivered / wall),
        "delivered_pct": round(100 * delivered / max(1, written), 1),
        "server_cpu_us_per_event": round(cpu / max(1, written) * 1e6, 2),
        "server_cpu_pct": round(100 * cpu / wall),
        "streams_at_20ms": round(per_s * STREAM_INTERVAL_S),
        **timings,
    }


def run_scale_bench(*, jobs: int = 512, publishers: int = 2, seconds: float = 4.0,
                    rounds: int = 3) -> list[dict[str, Any]]:
    """One row per side (one node, then a 3-primary cluster): medians of `rounds` rounds that
    alternate between the two sides, so both see the same machine; then a row of raw command
    rates on one cluster node (what a job's SSUBSCRIBE costs next to a PUBLISH)."""
    samples: dict[str, list[dict[str, Any]]] = {"single": [], "cluster": []}
    with _servers("single") as single, _servers("cluster") as cluster:
        for i in range(rounds):
            for kind, (url, pids) in (("single", single), ("cluster", cluster)):
                samples[kind].append(asyncio.run(_measure(
                    kind, url, pids, jobs=jobs, publishers=publishers, seconds=seconds, run=i
                )))
        raw = _raw_rates(cluster[0])
    return [_median_row(rows) for rows in samples.values()] + [raw]


def _raw_rates(cluster_url: str, n: int = 8000) -> dict[str, Any]:
    """Commands per second on one connection to one primary, one at a time and pipelined x16:
    SSUBSCRIBE then SUNSUBSCRIBE of `n` channels in that node's slots, and PUBLISH (100 bytes)."""
    import socket

    import hiredis
    import redis
    from redis.crc import key_slot

    from chatstream_cluster.shared.redis_topology import parse_redis_url

    host, port = parse_redis_url(cluster_url).hosts[0]
    with redis.Redis(host=host, port=port) as probe:
        slots = [(int(r[0]), int(r[1])) for r in probe.execute_command("CLUSTER", "SLOTS")
                 if int(r[2][1]) == port]
    channels: list[bytes] = []
    i = 0
    while len(channels) < n:
        channel = f"scale:job:{{c{i}}}:ch".encode()
        i += 1
        if any(lo <= key_slot(channel) <= hi for lo, hi in slots):
            channels.append(channel)
    payload = TEXT.encode()[:100]

    def rate(sock: socket.socket, make: Any, batch: int) -> int:
        reader = hiredis.Reader()
        started = time.perf_counter()
        for first in range(0, n, batch):
            sock.sendall(b"".join(hiredis.pack_command(make(c))
                                  for c in channels[first:first + batch]))
            got = 0
            while got < batch:
                reader.feed(sock.recv(1 << 16))
                while reader.gets() is not False:
                    got += 1
        return round(n / (time.perf_counter() - started))

    row: dict[str, Any] = {"scenario": "scale", "redis": "raw commands/s on one primary"}
    for batch, label in ((1, "one"), (16, "x16")):
        with socket.create_connection((host, port)) as sock:  # subscribe, then unsubscribe
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            row[f"ssubscribe_{label}"] = rate(sock, lambda c: ("SSUBSCRIBE", c), batch)
            row[f"sunsubscribe_{label}"] = rate(sock, lambda c: ("SUNSUBSCRIBE", c), batch)
        with socket.create_connection((host, port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            row[f"publish_{label}"] = rate(sock, lambda c: ("PUBLISH", c, payload), batch)
    return row


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, int | float) and key not in ("jobs", "publishers"):
            out[key] = statistics.median(r[key] for r in rows)
    out["rounds"] = len(rows)
    return out


async def _publish(url: str, prefix: str, jobs: list[str], seconds: float) -> dict[str, Any]:
    """A worker's publisher at full speed: one event per job per round, one pipeline a round."""
    from chatstream_cluster.shared.events import EventWriter, PendingPublish
    from chatstream_cluster.shared.keys import Keys
    from chatstream_cluster.shared.redis_client import make_redis
    from chatstream_cluster.shared.redis_topology import is_cluster
    from chatstream_cluster.shared.schemas import TokenEvent

    keys = Keys(prefix)
    redis = make_redis(url)
    writer = EventWriter(redis, keys, ttl_s=30)
    channel = (lambda j: keys.job_channel(j, "bench")) if is_cluster(redis) else (
        lambda _j: keys.gateway_channel("bench"))
    seq = 0
    events = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        seq += 1
        batch = [
            PendingPublish(TokenEvent.model_construct(
                job_id=j, seq=seq, attempt=1, text=TEXT, tokens=seq * 16, finish_reason=None,
                usage=None, error=None, prompt=None, worker_id="bench", parked=None), channel(j))
            for j in jobs
        ]
        results = await writer.publish(batch)
        events += sum(1 for r in results if r >= 0)
    elapsed = time.perf_counter() - started
    await redis.aclose()
    return {"events": events, "seconds": elapsed}


if __name__ == "__main__" and sys.argv[1:2] == ["publish"]:
    _url, _prefix, _jobs, _seconds = sys.argv[2:6]
    print(json.dumps(asyncio.run(_publish(_url, _prefix, _jobs.split(","), float(_seconds)))))
