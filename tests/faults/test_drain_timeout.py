"""`--drain-timeout` bounds a gateway's drain, down to 0 (close open streams at once); it never
means "no limit"."""

from __future__ import annotations

import time

import pytest

from tests.faults.test_worker_crash import StreamReader, expected

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("drain_timeout", [0, 0.5])
def test_gateway_drain_timeout_below_one_second_cuts_streams_instead_of_waiting(  # noqa: ANN001
    cluster, drain_timeout
) -> None:
    cluster.start_worker("mock", mock_tokens_per_s=10)
    gateway = cluster.start_gateway(drain_timeout=drain_timeout)
    cluster.wait_ready(gateway)
    reader = StreamReader(gateway.url, "a long reply", 300)  # 30 s at 10 tokens/s
    reader.start()
    assert reader.started_text.wait(15)
    gateway.terminate()
    started = time.monotonic()
    assert gateway.wait(20) == 0
    assert time.monotonic() - started < 15  # not the 30 s the stream would need
    assert reader.done.wait(10)
    assert reader.finish is None and reader.text != expected("a long reply", 300)
