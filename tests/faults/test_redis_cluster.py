"""A real 6-node Redis Cluster (3 primaries, 3 replicas) under real gateways and workers:
both APIs, a manual failover and a slot migration of a streaming job's slot."""

from __future__ import annotations

import uuid

import httpx
import orjson
import pytest
import redis as syncredis
from redis.crc import key_slot

from chatstream_cluster.shared.keys import Keys
from tests.cluster import Cluster, wait_until
from tests.faults.test_worker_crash import StreamReader, expected
from tests.gateway.test_chatstream_api import chat
from tests.gateway.test_chatstream_api import expected as chatstream_expected

pytestmark = pytest.mark.slow

PARTITIONS = 3


@pytest.fixture(scope="module")
def cluster_prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def on_cluster(redis_cluster, cluster_prefix, tmp_path_factory):  # noqa: ANN001, ANN201
    """One mock worker and one gateway on the cluster, the job queue in 3 partitions (shared
    by this module's tests: each fault leaves the cluster healthy)."""
    procs = Cluster(redis_cluster.url, cluster_prefix, tmp_path_factory.mktemp("on-cluster"))
    procs.start_worker("mock", mock_tokens_per_s=40, queue_partitions=PARTITIONS, max_batch=32)
    gateway = procs.start_gateway(queue_partitions=PARTITIONS, default_max_tokens=12)
    procs.wait_ready(gateway)
    yield procs, gateway
    procs.stop()


def job_of(reader: StreamReader) -> str:
    """The job id of a running stream (SSE ids are `<job id>:<seq>`)."""
    wait_until(lambda: reader.ids or reader.done.is_set(), 20, what="the first event")
    assert reader.ids, reader.errors
    return reader.ids[0].rsplit(":", 1)[0]


def moved_subscriptions(gateway_log: str) -> set[str]:
    """Jobs whose channel the gateway subscribed again after the server dropped it."""
    out = set()
    for line in gateway_log.splitlines():
        if line.startswith("{") and '"job channel subscribed again"' in line:
            out.add(orjson.loads(line)["job_id"])
    return out


def start_streams(url: str, n: int, tokens: int) -> list[StreamReader]:
    readers = [StreamReader(url, f"cluster stream {i}", tokens) for i in range(n)]
    for r in readers:
        r.start()
    return readers


def assert_exact(readers: list[StreamReader], tokens: int) -> None:
    for r in readers:
        assert r.done.wait(60), "stream did not end"
        assert r.errors == [], r.errors
        assert r.finish == "length"
        assert r.text == expected(r.content, tokens)


def test_openai_and_chatstream_paths_on_a_cluster(
    redis_cluster, on_cluster, cluster_prefix  # noqa: ANN001
) -> None:
    procs, gateway = on_cluster
    keys = Keys(cluster_prefix)
    reader = StreamReader(gateway.url, "sharded", 40)
    reader.start()
    job = job_of(reader)
    # The job's events travel on its own sharded channel, subscribed on the shard that owns
    # the job's slot; nothing goes through classic (cluster-wide) pub/sub.
    pattern = f"{keys.prefix}:job:{{{job}}}:ch:*"  # the job's channel, of any gateway
    owner = redis_cluster.owner(key_slot(job.encode()))
    with syncredis.Redis(port=owner) as node:
        channels = node.execute_command("PUBSUB", "SHARDCHANNELS", pattern)
        assert len(channels) == 1
        assert node.execute_command("PUBSUB", "SHARDNUMSUB", channels[0])[1] == 1
        assert node.execute_command("PUBSUB", "CHANNELS", f"{keys.prefix}:gw:*") == []
    assert_exact([reader], 40)

    # Non-streaming, and a few at once so jobs land in every partition and several slots.
    with httpx.Client(timeout=30) as client:
        for i in range(6):
            body = {"model": "mock", "messages": [{"role": "user", "content": f"plain {i}"}],
                    "max_tokens": 5}
            resp = client.post(gateway.url + "/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["message"]["content"] == expected(f"plain {i}", 5)
        # ChatStream: a session hash, its turn lock, two turns and a regenerate.
        first = chat(client, gateway.url, "hello cluster")
        assert first.text == chatstream_expected("hello cluster")
        second = chat(client, gateway.url, "and again")
        assert second.text == chatstream_expected("hello cluster", first.text, "and again")
        status = client.get(gateway.url + "/admin/status").json()
    assert status["undelivered_jobs"] == 0 and status["queue_depth"] == 0
    assert [w["id"] for w in status["workers"]] == [procs.procs[0].settings["worker_id"]]
    with syncredis.Redis(port=owner) as node:  # the finished job unsubscribed its channel
        assert node.execute_command("PUBSUB", "SHARDCHANNELS", pattern) == []


def test_failover_of_a_streaming_jobs_primary_keeps_the_text_exact(
    redis_cluster, on_cluster  # noqa: ANN001
) -> None:
    procs, gateway = on_cluster
    readers = start_streams(gateway.url, 4, 80)
    job = job_of(readers[0])
    wait_until(lambda: readers[0].started_text.is_set(), 20, what="text to flow")
    old, new = redis_cluster.failover(key_slot(job.encode()))
    assert old != new
    assert_exact(readers, 80)
    assert job in moved_subscriptions(procs.procs[1].log())
    assert all(p.alive() for p in procs.procs)


def test_migrating_a_live_jobs_slot_keeps_the_text_exact(redis_cluster, on_cluster) -> None:  # noqa: ANN001
    procs, gateway = on_cluster
    readers = start_streams(gateway.url, 4, 80)
    job = job_of(readers[0])
    wait_until(lambda: readers[0].started_text.is_set(), 20, what="text to flow")
    slot = key_slot(job.encode())
    source = redis_cluster.owner(slot)
    target = next(redis_cluster.owner(s) for s in (0, 8000, 16383)
                  if redis_cluster.owner(s) != source)
    redis_cluster.migrate_slot(slot, target)
    assert redis_cluster.owner(slot) == target
    assert_exact(readers, 80)
    assert job in moved_subscriptions(procs.procs[1].log())
