"""Fixtures of the fault tests: a Redis of the test's own (to kill, restart or freeze) and a
cluster on it."""

from __future__ import annotations

import pytest

from chatstream_cluster.shared.redis_server import RedisServer
from tests.cluster import Cluster


@pytest.fixture
def own_redis(tmp_path):  # noqa: ANN001, ANN201
    # appendfsync always: a crash loses no acknowledged write (see README, operations).
    server = RedisServer(tmp_path / "redis", appendonly=True, appendfsync="always").start()
    yield server
    server.stop()


@pytest.fixture
def own_cluster(own_redis, key_prefix, tmp_path):  # noqa: ANN001, ANN201
    procs = Cluster(own_redis.url, key_prefix, tmp_path)
    yield procs
    procs.stop()
