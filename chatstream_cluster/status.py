"""`chatstream status`: queue depth, running, capacity and workers as a table or JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from shared.cluster_status import cluster_status
from shared.keys import Keys
from shared.redis_client import make_redis
from shared.settings import CommonSettings


def render_table(status: dict) -> str:
    """The status as text: a summary line and one row per worker."""
    lines = [
        f"queue_depth {status['queue_depth']}   running {status['running']}/"
        f"{status['capacity']}   workers {len(status['workers'])}",
        "",
        f"{'ID':<28} {'PID':>7} {'HOST':<16} {'MODEL':<12} {'DEVICE':<8} {'RUN':>4} "
        f"{'MAX':>4} {'TOK/S':>8} {'BEAT_S':>6}",
    ]
    for w in status["workers"]:
        lines.append(
            f"{w['id'][:28]:<28} {w['pid']:>7} {w['host'][:16]:<16} {w['model'][:12]:<12} "
            f"{w['device']:<8} {w['running']:>4} {w['max_batch']:>4} {w['tokens_per_s']:>8} "
            f"{w['last_heartbeat_s']:>6}"
        )
    return "\n".join(lines)


async def _run(settings: CommonSettings, args: argparse.Namespace) -> int:
    redis = make_redis(settings.redis_url)
    keys = Keys(settings.key_prefix)
    try:
        while True:
            status = await cluster_status(redis, keys, args.max_concurrent)
            text = json.dumps(status, indent=2) if args.json else render_table(status)
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
                sys.stdout.flush()
                await asyncio.sleep(args.interval)
                continue
            print(text)
            return 0
    finally:
        await redis.aclose()


def main(settings: CommonSettings, args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(settings, args))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"error: cannot reach Redis at {settings.redis_url}: {exc}", file=sys.stderr)
        return 1
