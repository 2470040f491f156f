"""Worker lifecycle edge cases: a dead engine thread, and SIGTERM while Redis is unreachable."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from chatstream_cluster.shared.redis_server import free_port
from chatstream_cluster.shared.settings import WorkerSettings
from chatstream_cluster.worker.loop import Worker
from chatstream_cluster.worker.mock_engine import MockEngine
from tests.cluster import ROOT, wait_until


class BrokenEngine(MockEngine):
    """A mock engine whose thread dies on its first look for work."""

    def has_work(self) -> bool:
        raise RuntimeError("engine is broken")


async def test_dead_engine_thread_stops_the_worker_with_a_failure(redis_url, key_prefix) -> None:  # noqa: ANN001
    worker = Worker(WorkerSettings(redis_url=redis_url, key_prefix=key_prefix), BrokenEngine())
    await asyncio.wait_for(worker.run(), 20)
    assert worker.engine_failed


def test_sigterm_is_honoured_while_redis_is_unreachable(tmp_path) -> None:  # noqa: ANN001
    env = {**os.environ, "CHATSTREAM_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "CHATSTREAM_LOG_FORMAT": "json"}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chatstream_cluster.cli", "worker", "--model", "mock"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: b"redis unavailable" in log.read_bytes(), 30, what="a retry")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
