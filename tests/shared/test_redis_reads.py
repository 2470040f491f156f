"""A busy event loop does not turn a prompt Redis reply into a timeout; a frozen Redis still
times out on time (shared/redis_reads.py), against real redis-server processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatstream_cluster.shared.redis_client import make_redis
from chatstream_cluster.shared.redis_server import RedisServer

TIMEOUT = 0.3


async def test_a_reply_read_late_by_a_busy_loop_is_not_a_timeout(redis_url: str) -> None:
    client = make_redis(redis_url, socket_timeout=TIMEOUT)
    conn = await client.connection_pool.get_connection()
    try:
        reply = asyncio.ensure_future(conn.read_response())
        await asyncio.sleep(0)  # the read starts waiting: its timer is armed
        assert not reply.done()
        # Send PING and, without yielding, keep the loop busy past the deadline (as a burst
        # of requests does): the PONG is there long before, but the loop sees it in the same
        # turn as the timer.
        conn._writer.write(b"*1\r\n$4\r\nPING\r\n")  # noqa: SLF001 - a write with no yield
        time.sleep(2 * TIMEOUT)  # noqa: ASYNC251 - blocking the loop is what is tested
        assert await reply == b"PONG"
        assert conn.is_connected
    finally:
        await client.connection_pool.release(conn)
        await client.aclose()


async def test_a_frozen_redis_still_times_out_on_time(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    client = make_redis(server.url, socket_timeout=TIMEOUT)
    try:
        await client.ping()
        os.kill(server.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await client.ping()
        assert time.monotonic() - started < TIMEOUT + 0.3
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        await client.aclose()
        server.stop()
