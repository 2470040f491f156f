"""SIGTERM drains a worker or a gateway with no broken stream; a gateway first reports not ready
for `--shutdown-grace` while it still serves."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.cluster import wait_until
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


def test_sigterm_while_the_model_loads_exits_0_at_once(cluster) -> None:  # noqa: ANN001
    """A pod scaled away before it was ready: the load (here the test-only cold start, which
    waits where a model loads) is not waited for, and the exit is clean."""
    worker = cluster.start_worker("mock", env={"CHATSTREAM_TEST_COLD_START": "60"})
    wait_until(lambda: "test-only cold start" in worker.log(), 30, what="the model load")
    signalled = time.monotonic()
    worker.terminate()
    assert worker.wait(20) == 0  # not killed by the signal (-15)
    assert time.monotonic() - signalled < 15  # not after the 60 s load
    assert "stopped while starting" in worker.log()


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


def _readyz(url: str) -> int:
    with httpx.Client(timeout=2, headers={"Connection": "close"}) as client:
        return client.get(url + "/readyz").status_code


def _accepts(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=2, headers={"Connection": "close"})
    except httpx.ConnectError:
        return False
    return True


def test_sigterm_gateway_is_not_ready_for_the_grace_while_it_still_serves(cluster) -> None:  # noqa: ANN001
    grace = 3.0
    cluster.start_worker("mock", mock_tokens_per_s=40)
    gateway = cluster.start_gateway(shutdown_grace=grace, drain_timeout=30)
    cluster.wait_ready(gateway)
    reader = StreamReader(gateway.url, "graceful", 200)  # ~5 s: outlives the grace
    reader.start()
    assert reader.started_text.wait(15)
    signalled = time.monotonic()
    gateway.terminate()
    wait_until(lambda: _readyz(gateway.url) == 503, 5, what="/readyz to turn 503")
    body = httpx.get(gateway.url + "/readyz", timeout=2, headers={"Connection": "close"}).json()
    assert body["draining"] is True
    # Not ready, but still accepting and serving, new generations included, for the grace.
    late = StreamReader(gateway.url, "during the grace", 5)
    late.run()
    assert late.status == 200 and late.errors == [] and late.text == expected("during the grace", 5)
    assert time.monotonic() - signalled < grace, "the grace ended before the check"
    # Then it stops accepting; the stream that was open finishes whole; exit 0.
    wait_until(lambda: not _accepts(gateway.url), grace + 10, what="the listener to close")
    assert time.monotonic() - signalled >= grace * 0.9
    assert reader.done.wait(30)
    assert reader.errors == [] and reader.text == expected("graceful", 200)
    assert gateway.wait(30) == 0


def test_head_and_second_signal_skip_the_rest_of_the_grace(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock")
    gateway = cluster.start_gateway(shutdown_grace=60)
    cluster.wait_ready(gateway)
    gateway.terminate()
    wait_until(lambda: httpx.head(gateway.url + "/readyz", timeout=2).status_code == 503, 5,
               what="HEAD /readyz to turn 503")
    gateway.terminate()  # a second SIGTERM: leave now, not after 60 s
    assert gateway.wait(15) == 0
