"""`chatstream healthcheck`: for container HEALTHCHECKs (no curl in slim images)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import urllib.request

from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.redis_client import make_redis
from chatstream_cluster.shared.registry import WorkerRegistry
from chatstream_cluster.shared.settings import CommonSettings


async def _worker_alive(settings: CommonSettings, worker_id: str) -> bool:
    redis = make_redis(settings.redis_url)
    try:
        return await WorkerRegistry(redis, Keys(settings.key_prefix)).is_alive(worker_id)
    finally:
        await redis.aclose()


def main(settings: CommonSettings, args: argparse.Namespace) -> int:
    """Exit 0 when `--url` answers 200, or `--worker-id` heartbeats in Redis; 1 otherwise."""
    try:
        if args.url:
            with urllib.request.urlopen(args.url, timeout=args.timeout) as resp:
                return 0 if resp.status == 200 else 1
        if args.worker_id:
            alive = asyncio.run(
                asyncio.wait_for(_worker_alive(settings, args.worker_id), args.timeout)
            )
            return 0 if alive else 1
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print("error: give --url or --worker-id", file=sys.stderr)
    return 2
