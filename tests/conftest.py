"""Shared fixtures: a real redis-server per test session on a free port, and clean keys per test;
a real 6-node Redis Cluster per session and a real Sentinel setup per test that asks for one."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from chatstream_cluster.shared.redis_local import LocalRedisCluster, LocalSentinel
from chatstream_cluster.shared.redis_server import RedisServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server (append-only on) for the whole session."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """A real Redis Cluster, 3 primaries and 3 replicas, for the whole session (tests that fail
    over or move slots leave it healthy, with other owners)."""
    nodes = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"), primaries=3, replicas=1)
    yield nodes.start()
    nodes.stop()


@pytest.fixture
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSentinel]:
    """A fresh primary, one replica and three sentinels (tests kill primaries)."""
    setup = LocalSentinel(tmp_path_factory.mktemp("redis-sentinel"), replicas=1, sentinels=3)
    yield setup.start()
    setup.stop()


@pytest.fixture
def key_prefix() -> str:
    """A fresh key prefix per test, so tests never see each other's keys."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client on the session's real redis-server."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo model, built once per test session into a temp cache folder."""
    from chatstream_cluster.worker.demo_model import build_demo_model

    return build_demo_model(str(tmp_path_factory.mktemp("models")))


@pytest.fixture
def cluster(redis_url: str, key_prefix: str, tmp_path):  # noqa: ANN001, ANN201
    """Start gateways and workers as real processes; all are stopped after the test."""
    from tests.cluster import Cluster

    procs = Cluster(redis_url, key_prefix, tmp_path)
    yield procs
    procs.stop()
