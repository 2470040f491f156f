"""`chatstream status`: queue depth, running, capacity and workers as a table or JSON.

The numbers come from `shared.cluster_status`, the same code behind the gateways'
`/admin/status` and `/metrics`, with one row per served model (WORKERS: serving/live; QUEUE =
PERMIT, waiting for a permit, + UNREAD, enqueued and not yet read by a worker) and one per
worker. `--json` prints exactly the `/admin/status` object; `--watch`
redraws the screen every `--interval` seconds until Ctrl-C (with `--json`, one object per
refresh). Capacity is what the live gateways publish in Redis (their `--max-concurrent`), else
the sum of the live workers' `--max-batch`, as the gateways derive it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from chatstream_cluster.shared.cluster_status import cluster_status
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.redis_client import make_redis, redact_url
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS
from chatstream_cluster.shared.settings import CommonSettings

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: each --watch refresh starts with it


def render_models(models: list[dict]) -> list[str]:
    """One row per served model: its own queue, running/capacity and workers."""
    lines = [f"{'MODEL':<32} {'QUEUE':>6} {'PERMIT':>6} {'UNREAD':>6} {'RUN':>5} {'CAP':>5} "
             f"{'WORKERS':>8} {'WAIT':>5} {'TOK/S':>8}"]
    for m in models:
        workers = f"{m['serving']}/{m['workers']}"
        lines.append(
            f"{m['name'][:32]:<32} {m['queue_depth']:>6} {m['waiting_for_permit']:>6} "
            f"{m['undelivered_jobs']:>6} {m['running']:>5} {m['capacity']:>5} {workers:>8} "
            f"{m['waiting_in_workers']:>5} {m['tokens_per_s']:>8}"
        )
    if not models:
        lines.append("(no model known yet)")
    return lines


def render_table(status: dict) -> str:
    """The status as text: a summary line, one row per served model and one per worker."""
    lines = [
        f"queue_depth {status['queue_depth']} (waiting for a permit "
        f"{status['waiting_for_permit']}, not yet read by a worker "
        f"{status['undelivered_jobs']})   running {status['running']}/{status['capacity']}"
        f"   gateways {len(status['gateways'])}   workers {len(status['workers'])}"
        f"   waiting in workers {status.get('waiting_in_workers', 0)}",
        "",
        *render_models(status.get("models", [])),
        "",
        f"{'ID':<28} {'PID':>7} {'HOST':<16} {'MODEL':<12} {'DEVICE':<8} {'RUN':>4} "
        f"{'MAX':>4} {'WAIT':>4} {'KV_TOKENS':>15} {'TOK/S':>8} {'BEAT_S':>6}  STATE",
    ]
    for w in status["workers"]:
        lines.append(
            f"{w['id'][:28]:<28} {w['pid']:>7} {w['host'][:16]:<16} {w['model'][:12]:<12} "
            f"{w['device'][:8]:<8} {w['running']:>4} {w['max_batch']:>4} "
            f"{w.get('waiting', 0):>4} {_kv(w):>15} "
            f"{w['tokens_per_s']:>8} {w['last_heartbeat_s']:>6}  "
            + w.get("state", "draining" if w.get("draining") else "serving")
        )
    if not status["workers"]:
        lines.append("(no live worker)")
    if "last_minute" in status:
        lines[1:1] = [render_last_minute(status["last_minute"])]
    return "\n".join(lines)


def _kv(worker: dict) -> str:
    """KV cache tokens reserved / total, '-' for an engine without one (mock)."""
    total = worker.get("kv_tokens_total", 0)
    return f"{worker.get('kv_tokens_used', 0)}/{total}" if total else "-"


def render_last_minute(m: dict) -> str:
    """One line: the cluster's last-minute tokens/s, TTFT percentiles and rejections."""
    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}s"

    rejected = " ".join(f"{k} {v}" for k, v in m["rejected"].items()) or "none"
    return (f"last minute (cluster): {m['tokens_per_s']:g} tok/s   TTFT p50 "
            f"{secs(m['ttft_p50_s'])} p99 {secs(m['ttft_p99_s'])}   rejected: {rejected}")


async def _run(settings: CommonSettings, args: argparse.Namespace) -> int:
    redis = make_redis(settings.redis_url)
    keys = Keys(settings.key_prefix)
    try:
        while True:
            try:
                status = await cluster_status(redis, keys)
                if args.json:
                    text = json.dumps(status, indent=None if args.watch else 2)
                else:
                    text = render_table(status)
            except TRANSIENT_REDIS_ERRORS as exc:
                if not args.watch:
                    raise
                error = f"cannot reach Redis at {redact_url(settings.redis_url)}: {exc}"
                text = json.dumps({"error": error}) if args.json else error
            if not args.watch:
                print(text)
                return 0
            if args.json:
                sys.stdout.write(text + "\n")
            else:
                stamp = time.strftime("%H:%M:%S")
                sys.stdout.write(
                    f"{CLEAR}chatstream status   {stamp}   every "
                    f"{args.interval:g}s, Ctrl-C to stop\n\n{text}\n"
                )
            sys.stdout.flush()
            await asyncio.sleep(max(0.1, args.interval))
    finally:
        await redis.aclose()



def main(settings: CommonSettings, args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(settings, args))
    except KeyboardInterrupt:
        return 0
    except TRANSIENT_REDIS_ERRORS as exc:
        print(
            f"error: cannot reach Redis at {redact_url(settings.redis_url)}: {exc}", file=sys.stderr
        )
        return 1
