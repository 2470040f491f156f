"""`chatstream feedback`: export the /set_feedback stream as JSON lines.

The stream (`<prefix>:feedback`) keeps about `--feedback-max-entries` entries, none older than
`--feedback-retention`; run this (from cron, say) more often than that to keep every entry.
Each line is one feedback (`id` plus the fields the app's `on_feedback` hook receives), oldest
first. `--after ID` starts after an entry already exported: the last id written is printed on
stderr, ready for the next run's `--after`. Entries are read in pages; nothing is deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TextIO

from redis.exceptions import RedisError

from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.redis_client import make_redis, redact_url
from chatstream_cluster.shared.settings import CommonSettings

PAGE = 500


async def export(settings: CommonSettings, out: TextIO, after: str = "") -> tuple[int, str]:
    """Write the entries after `after` (all when empty) to `out`; returns (count, last id)."""
    redis = make_redis(settings.redis_url)
    stream = Keys(settings.key_prefix).feedback
    start, count, last = f"({after}" if after else "-", 0, after
    try:
        while True:
            entries = await redis.xrange(stream, min=start, max="+", count=PAGE)
            for entry_id, fields in entries:
                last = entry_id.decode()
                data = json.loads(fields.get(b"data", b"{}"))
                out.write(json.dumps({"id": last, **data}, ensure_ascii=False) + "\n")
                count += 1
            if len(entries) < PAGE:
                return count, last
            start = f"({last}"
    finally:
        await redis.aclose()


def main(settings: CommonSettings, args: argparse.Namespace) -> int:
    """Entry point of `chatstream feedback`; exit 1 when Redis cannot be read."""
    out = open(args.out, "a", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
    try:
        count, last = asyncio.run(export(settings, out, args.after))
    except RedisError as exc:  # any: the export did not happen
        print(f"chatstream: error: Redis at {redact_url(settings.redis_url)}: {exc}",
              file=sys.stderr)
        return 1
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"exported {count} feedback entries; last id: {last or '-'}", file=sys.stderr)
    return 0
