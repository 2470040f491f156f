"""Redis URLs (one node, Cluster, Sentinel), the partitioned job queue and the WAIT policy."""

from __future__ import annotations

import asyncio
import time

import pytest

from chatstream_cluster.shared.events import EventWriter, PendingPublish
from chatstream_cluster.shared.job_state import JobStates
from chatstream_cluster.shared.jobqueue import JobQueue
from chatstream_cluster.shared.keys import JOBS_GROUP, Keys
from chatstream_cluster.shared.redis_client import make_redis, redact_url
from chatstream_cluster.shared.redis_topology import (
    SENTINEL_POOLS,
    RedisURLError,
    as_cluster_url,
    parse_redis_url,
)
from chatstream_cluster.shared.replica_wait import ReplicaWait
from chatstream_cluster.shared.schemas import ChatMessage, JobSpec, SamplingParams, TokenEvent
from chatstream_cluster.shared.settings import GatewaySettings


def test_one_node_urls_go_to_redis_py_unchanged() -> None:
    for url in ("redis://:pw@h:6380/2", "rediss://h", "unix:///tmp/r.sock"):
        topo = parse_redis_url(url)
        assert (topo.kind, topo.url) == ("single", url)


def test_cluster_url() -> None:
    topo = parse_redis_url("rediss+cluster://user:p%40ss@a:7000,b,[::1]:7002?ssl_ca_certs=/ca")
    assert topo.kind == "cluster" and topo.ssl
    assert topo.hosts == (("a", 7000), ("b", 6379), ("::1", 7002))
    assert (topo.username, topo.password) == ("user", "p@ss")
    assert topo.auth() == {"username": "user", "password": "p@ss", "ssl": True,
                           "ssl_ca_certs": "/ca"}
    assert as_cluster_url("redis://:pw@h:7000/0") == "redis+cluster://:pw@h:7000"
    settings = GatewaySettings(redis_url="redis://h:7000", redis_cluster=True)
    assert settings.redis_url == "redis+cluster://h:7000"


def test_sentinel_url() -> None:
    topo = parse_redis_url(
        "redis+sentinel://:pw@s1:26380,s2/mymaster/3?sentinel_password=sp&wait_timeout_ms=250"
    )
    assert topo.kind == "sentinel" and topo.master_name == "mymaster" and topo.db == 3
    assert topo.hosts == (("s1", 26380), ("s2", 26379))
    assert (topo.password, topo.sentinel_password) == ("pw", "sp")
    assert (topo.wait_replicas, topo.wait_timeout_ms) == (1, 250)
    assert "sp" not in redact_url(topo.url) and "pw" not in redact_url(topo.url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1:26379", "master name"),
        ("redis+cluster://a:7000/3", "database 0"),
        ("redis+cluster://a:7000?colour=red", "unknown option"),
        ("redis+cluster://a:port", "bad port"),
        ("redis+cluster://", "no host"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(RedisURLError, match=message):
        parse_redis_url(url)


async def test_a_sentinel_client_waits_for_a_replica_and_moves_on_failover() -> None:
    client = make_redis("redis+sentinel://127.0.0.1:1/m?wait_replicas=2&wait_timeout_ms=30")
    try:
        wait = ReplicaWait.of(client)
        assert wait is not None and (wait.replicas, wait.timeout_ms) == (2, 30)
        assert client.connection_pool in SENTINEL_POOLS
    finally:
        await client.aclose()


# --- the partitioned job queue (a real server: blocking reads) ----------------------------------


def spec(job_id: str) -> JobSpec:
    return JobSpec(job_id=job_id, reply_channel="ch", messages=[ChatMessage(role="user",
                   content="x")], sampling=SamplingParams(max_tokens=1), created_ms=0)


async def pending_of(redis, queue: JobQueue, consumer: str) -> int:  # noqa: ANN001
    """Entries delivered to `consumer` and not yet acknowledged, over every partition."""
    total = 0
    for stream in queue.streams:
        info = await redis.xpending(stream, JOBS_GROUP)
        total += sum(int(c["pending"]) for c in info["consumers"] if c["name"] == consumer.encode())
    return total


async def test_partitions_spread_jobs_and_a_read_never_takes_more_than_asked(
    redis, key_prefix: str  # noqa: ANN001
) -> None:
    queue = JobQueue(redis, Keys(key_prefix), model="m", partitions=3)
    await queue.check_partitions()
    await queue.ensure_group()
    refs = [await queue.enqueue(spec(f"job{i}"), owner="open", listener="l") for i in range(9)]
    assert {r.split("/")[0] for r in refs if "/" in r} == {"1", "2"}  # and plain ids: partition 0
    assert await queue.undelivered() == 9

    first = await queue.read("w", 4, block_ms=100)
    assert len(first) == 4 and await pending_of(redis, queue, "w") == 4
    rest = await queue.read("w", 100, block_ms=100)
    assert len(rest) == 5
    assert sorted(e.spec.job_id for e in first + rest) == sorted(f"job{i}" for i in range(9))
    await queue.touch("w", [e.entry_id for e in first + rest])
    for entry in first + rest:
        await queue.finish(entry.entry_id)
    assert await queue.undelivered() == 0 and await pending_of(redis, queue, "w") == 0

    # Nothing queued: a read blocks on at most `count` partitions, one entry each, and wakes
    # as soon as a job arrives anywhere it watches.
    reader = asyncio.create_task(queue.read("w", 2, block_ms=3000))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    for i in range(9):  # a burst into every partition
        await queue.enqueue(spec(f"burst{i}"), owner="open", listener="l")
    got = await reader
    assert got and time.monotonic() - started < 2
    # However many arrived, the consumer holds at most what it asked for (2) ...
    assert await pending_of(redis, queue, "w") <= 2
    more = await queue.read("w", 2 - len(got), block_ms=100)
    assert len(got) + len(more) <= 2
    # ... and the rest stays for other workers.
    others = await queue.read("other", 100, block_ms=100)
    assert len(got) + len(more) + len(others) == 9
    await queue.close()


async def test_processes_must_agree_on_the_partition_count(redis, key_prefix: str) -> None:  # noqa: ANN001
    await JobQueue(redis, Keys(key_prefix), model="m", partitions=4).check_partitions()
    await JobQueue(redis, Keys(key_prefix), model="m", partitions=4).check_partitions()
    with pytest.raises(ValueError, match="--queue-partitions 1, but .* use 4"):
        await JobQueue(redis, Keys(key_prefix), model="m").check_partitions()


async def test_a_vanished_job_stream_is_created_again(redis, key_prefix: str) -> None:  # noqa: ANN001
    for partitions in (1, 2):
        keys = Keys(f"{key_prefix}{partitions}")
        queue = JobQueue(redis, keys, model="m", partitions=partitions)
        await queue.ensure_group()
        await redis.delete(*queue.streams)  # what a failover to an unsynced replica leaves
        assert await queue.read("w", 1, block_ms=50) == []
        await queue.enqueue(spec("again"), owner="open", listener="l")
        got = await queue.read("w", 1, block_ms=500)
        assert [e.spec.job_id for e in got] == ["again"]
        await queue.close()


# --- WAIT after the writes a failover must not lose ---------------------------------------------


async def test_writes_that_must_survive_a_failover_wait_for_a_replica(
    redis, key_prefix: str  # noqa: ANN001
) -> None:
    """On a server without replicas WAIT answers 0 after its timeout: the write stands, and
    WAITs pause instead of slowing every request."""
    keys = Keys(key_prefix)
    wait = ReplicaWait(1, 200, backoff_s=60)
    wait.attach(redis)
    try:
        queue, states = JobQueue(redis, keys, model="m"), JobStates(redis, keys)
        await queue.ensure_group()
        started = time.monotonic()
        await queue.enqueue(spec("w1"), owner="open", listener="l")
        assert time.monotonic() - started >= 0.19  # WAIT ran and timed out
        assert ReplicaWait.of(redis) is None  # paused now
        nonce = (await redis.hget(keys.job_meta("w1"), "nonce")).decode()
        started = time.monotonic()
        assert await states.begin_attempt("w1", nonce, "worker") == (1, 0, "")
        assert time.monotonic() - started < 0.15
        wait._paused_until = 0  # due again: the fence bump is followed by WAIT too
        started = time.monotonic()
        assert await states.begin_attempt("w1", nonce, "worker") == (2, 0, "")
        assert time.monotonic() - started >= 0.19
        assert ReplicaWait.of(redis) is None
        wait._paused_until = 0
        writer = EventWriter(redis, keys, 60)
        event = TokenEvent(job_id="w1", seq=1, attempt=2, text="a")
        assert await writer.publish([PendingPublish(event, "ch")]) == [0]  # WAIT's reply dropped
    finally:
        del redis.chatstream_replica_wait
