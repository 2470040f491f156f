"""SIGTERM drains a worker or a gateway with no broken stream."""

from __future__ import annotations

import httpx
import pytest

from tests.faults.test_worker_crash import StreamReader, expected

pytestmark = pytest.mark.slow


def test_sigterm_worker_finishes_in_flight_jobs_and_exits_0(cluster) -> None:  # noqa: ANN001
    worker = cluster.start_worker("mock", mock_tokens_per_s=50, drain_timeout=30)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    reader = StreamReader(gateway.url, "drain me", 60)
    reader.start()
    assert reader.started_text.wait(15)
    worker.terminate()
    assert reader.done.wait(30)
    assert reader.errors == [] and reader.text == expected("drain me", 60)
    assert worker.wait(30) == 0


def test_drain_timeout_hands_unfinished_jobs_to_another_worker(cluster) -> None:  # noqa: ANN001
    takeover = {"job_claim_idle": 1.0, "worker_ttl": 1.0, "mock_tokens_per_s": 30}
    first = cluster.start_worker("mock", drain_timeout=0.5, **takeover)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    reader = StreamReader(gateway.url, "hand over", 120)
    reader.start()
    assert reader.started_text.wait(15)
    cluster.start_worker("mock", **takeover)
    cluster.wait_ready(gateway, workers=2)
    first.terminate()
    assert first.wait(30) == 0
    assert reader.done.wait(40)
    assert reader.errors == [] and reader.text == expected("hand over", 120)


def test_sigterm_gateway_lets_open_streams_finish(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", mock_tokens_per_s=50)
    gateway = cluster.start_gateway(drain_timeout=30)
    cluster.wait_ready(gateway)
    reader = StreamReader(gateway.url, "gateway drain", 60)
    reader.start()
    assert reader.started_text.wait(15)
    gateway.terminate()
    assert reader.done.wait(30)
    assert reader.errors == [] and reader.text == expected("gateway drain", 60)
    assert gateway.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(gateway.url + "/healthz", timeout=2)
