"""`chatstream feedback`: the feedback stream as JSON lines, resumable with --after."""

from __future__ import annotations

import json
import subprocess
import sys

import redis.asyncio as aioredis

from chatstream_cluster.shared.keys import Keys
from tests.cluster import ROOT


def _export(redis_url: str, key_prefix: str, *extra: str) -> tuple[list[dict], str]:
    done = subprocess.run(
        [sys.executable, "-m", "chatstream_cluster.cli", "feedback", "--redis-url", redis_url,
         "--key-prefix", key_prefix, *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()], done.stderr


async def test_export_writes_every_entry_once_in_order(redis: aioredis.Redis, redis_url,  # noqa: ANN001
                                                       key_prefix) -> None:  # noqa: ANN001
    stream = Keys(key_prefix).feedback
    ids = [(await redis.xadd(stream, {"data": json.dumps({"message_id": f"m{i}",
                                                           "is_like": i % 2 == 0})})).decode()
           for i in range(1203)]  # more than two pages
    rows, stderr = _export(redis_url, key_prefix)
    assert [r["id"] for r in rows] == ids
    assert rows[5] == {"id": ids[5], "message_id": "m5", "is_like": False}
    assert f"last id: {ids[-1]}" in stderr
    newer = (await redis.xadd(stream, {"data": json.dumps({"message_id": "new"})})).decode()
    rows, _ = _export(redis_url, key_prefix, "--after", ids[-1])
    assert rows == [{"id": newer, "message_id": "new"}]
