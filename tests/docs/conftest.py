"""The cluster the docs' code blocks run against: two mock workers, one served as model `mock`
and one as `demo`, and two gateways (one open, one with keys; the ChatStream endpoints use
`demo`), started once for the whole docs test (tests/docs/snippets.py says how the
blocks address them)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from chatstream_cluster.shared.redis_server import RedisServer
from tests.cluster import Cluster
from tests.docs.snippets import Target


@pytest.fixture(scope="module")
def docs_target(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Target]:
    prefix = "docs" + uuid.uuid4().hex[:8]
    cluster = Cluster(redis_server.url, prefix, tmp_path_factory.mktemp("docs-cluster"))
    keys = {"api_keys": ["docs-test-api-key"], "admin_key": "docs-test-admin-key"}
    try:
        cluster.start_worker("mock")
        cluster.start_worker("mock", served_model_name="demo")  # two models side by side
        open_gateway = cluster.start_gateway(default_model="demo")
        keyed_gateway = cluster.start_gateway(default_model="demo", **keys)
        cluster.wait_ready(open_gateway, workers=2)
        cluster.wait_ready(keyed_gateway, workers=2)
        yield Target(open_gateway.url, keyed_gateway.url, keys["api_keys"][0],
                     keys["admin_key"], redis_server.url, prefix)
    finally:
        cluster.stop()
