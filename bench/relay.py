"""Relay benchmarks: what the Redis hop costs, and how many slow streams one gateway holds.

- `run_relay_bench` ("relay"): the mock engine at full speed, 64 streams x 1,000 tokens,
  through client -> gateway -> Redis -> worker -> Redis -> gateway -> client; and, in the same
  run with the same client (`bench.client.run_streams`), a plain FastAPI app that streams the
  same SSE chunks from an in-process generator (`bench.baseline_app`). Rounds alternate
  between the two; each reports its median.
- `run_many_streams_bench` ("many"): 1,000 concurrent streams at 10 tokens/s x 50 tokens on one
  gateway process, through the raw client (`run_raw_streams`); the gateway's RSS and CPU come
  from psutil on its pid, the delay the relay adds from each chunk's arrival against the mock
  engine's fixed token schedule (`schedule_lateness`).

Everything runs on a private redis-server (no persistence) and real processes (tests/cluster.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.client import percentile, run_raw_streams, run_streams, schedule_lateness
from chatstream_cluster.shared.procs import die_with_parent
from chatstream_cluster.shared.redis_server import RedisServer, free_port
from tests.cluster import ROOT, Cluster, wait_until

PROMPT = [{"role": "user", "content": "Tell me a long story about a cat and a dog."}]


def _body(max_tokens: int) -> dict[str, Any]:
    return {
        "model": "mock",
        "messages": PROMPT,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
    }


def _raise_open_files(want: int) -> None:
    """Enough file descriptors for `want` sockets here and in the children started after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@contextlib.contextmanager
def _baseline_server(log_path: Path) -> Iterator[str]:
    """`bench.baseline_app` under uvicorn in a child process; yields its URL."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.baseline_app", "--port", str(port)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"baseline app exited:\n{log_path.read_text()[-2000:]}")
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 30, what="baseline app")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


class ProcWatch:
    """CPU seconds of some processes over a window, and the peak RSS of the first one."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._cpu0: dict[str, float] = {}
        self.cpu_s: dict[str, float] = {}
        self.seconds = 0.0

    def _cpu(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            t = proc.cpu_times()
            out[name] = t.user + t.system
        return out

    def _sample(self) -> None:
        first = next(iter(self.procs.values()))
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, first.memory_info().rss)

    def __enter__(self) -> ProcWatch:
        self._cpu0 = self._cpu()
        self._t0 = time.perf_counter()
        self.peak_rss = next(iter(self.procs.values())).memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._t0
        end = self._cpu()
        self.cpu_s = {name: end[name] - self._cpu0[name] for name in end}

    def cpu_pct(self, name: str) -> float:
        """Average CPU of one process over the window, in % of one core."""
        return round(100 * self.cpu_s[name] / self.seconds, 1) if self.seconds else 0.0


def _median(runs: list[dict[str, Any]], key: str) -> Any:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 1) if values else None


def run_relay_bench(
    streams: int = 64, tokens: int = 1000, rounds: int = 5
) -> list[dict[str, Any]]:
    """Tokens/s to the clients through the full path vs an in-process generator (median)."""
    body = _body(tokens)
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis", appendonly=False).start()
        cluster = Cluster(redis.url, "bench", Path(tmp))
        try:
            with _baseline_server(Path(tmp) / "baseline.log") as base_url:
                worker = cluster.start_worker("mock", max_batch=streams, log_level="warning")
                gateway = cluster.start_gateway(max_queue=1024, log_level="warning")
                cluster.wait_ready(gateway)
                pids = {"gateway": gateway.pid, "worker": worker.pid, "redis": redis.process.pid}
                for url in (base_url, gateway.url):  # warm-up: connections, imports, caches
                    asyncio.run(run_streams(url, 4, _body(50)))
                ours: list[dict[str, Any]] = []
                base: list[dict[str, Any]] = []
                for _ in range(rounds):
                    base.append(asyncio.run(run_streams(base_url, streams, body)))
                    with ProcWatch(pids) as watch:
                        run = asyncio.run(run_streams(gateway.url, streams, body))
                    run.update({f"{n}_cpu_pct": watch.cpu_pct(n) for n in pids})
                    ours.append(run)
        finally:
            cluster.stop()
            redis.stop()
    rows = []
    for name, runs in (("in-process baseline", base), ("gateway+redis+worker", ours)):
        rows.append(
            {
                "scenario": "relay",
                "server": name,
                "streams": streams,
                "tokens_per_stream": tokens,
                "ok": min(r["ok"] for r in runs),
                "failed": max(r["failed"] for r in runs),
                "first_error": next((r["first_error"] for r in runs if r["first_error"]), ""),
                "tokens_per_s": _median(runs, "tokens_per_s"),
                "runs_tokens_per_s": "/".join(f"{r['tokens_per_s']:.0f}" for r in runs),
                "events_per_stream": _median(runs, "events_per_stream"),
                "ttft_p50_ms": _median(runs, "ttft_p50_ms"),
                "gap_p99_ms": _median(runs, "gap_p99_ms"),
                **{k: _median(runs, k) for k in runs[0] if k.endswith("_cpu_pct")},
            }
        )
    base_tps, ours_tps = rows[0]["tokens_per_s"], rows[1]["tokens_per_s"]
    rows[1]["ratio"] = round(ours_tps / base_tps, 2) if base_tps else None
    return rows


def _many_round(url: str, pid: int, streams: int, tokens: int, rate: float) -> dict[str, Any]:
    with ProcWatch({"gateway": pid}) as watch:
        summary, results = asyncio.run(
            run_raw_streams(url, streams, _body(tokens), timeout=110)
        )
    ok = [r for r in results if r.status == 200 and not r.error]
    # Steady state: once every stream has its first token (the admission burst is over).
    ramp_end = max((r.marks[0][0] for r in ok if r.marks), default=0.0)
    late, steady, steady_gaps = [], [], []
    for r in ok:
        lateness = schedule_lateness(r.marks, rate)
        late += lateness
        steady += [x for x, (t, _) in zip(lateness, r.marks, strict=True) if t > ramp_end]
        pairs = zip(r.marks, r.marks[1:], strict=False)
        steady_gaps += [t1 - t0 for (t0, _), (t1, _) in pairs if t0 > ramp_end]
    gaps = [g for r in ok for g in r.gaps]
    statuses: dict[int, int] = {}
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1

    def ms(values: list[float], q: float) -> float | None:
        return round(percentile(values, q) * 1000, 1) if values else None

    return {
        "ok": summary["ok"],
        "failed": summary["failed"],
        "statuses": " ".join(f"{k}:{v}" for k, v in sorted(statuses.items())),
        "first_error": summary["first_error"],
        "complete": sum(1 for r in ok if r.tokens == tokens),
        "seconds": summary["seconds"],
        "events_per_stream": summary["events_per_stream"],
        "ttft_p50_ms": summary["ttft_p50_ms"],
        "ttft_p99_ms": summary["ttft_p99_ms"],
        "gateway_rss_peak_mb": round(watch.peak_rss / 2**20, 1),
        "gateway_cpu_pct": watch.cpu_pct("gateway"),
        "gateway_cpu_s": round(watch.cpu_s["gateway"], 2),
        "gap_p50_ms": ms(gaps, 0.5),
        "gap_p99_ms": ms(gaps, 0.99),
        "added_p50_ms": ms(late, 0.5),
        "added_p99_ms": ms(late, 0.99),
        "steady_gap_p99_ms": ms(steady_gaps, 0.99),
        "steady_added_p99_ms": ms(steady, 0.99),
    }


def run_many_streams_bench(
    streams: int = 1000, tokens: int = 50, tokens_per_s: float = 10.0, rounds: int = 3
) -> list[dict[str, Any]]:
    """`streams` slow streams at once on one gateway: all 200, its RSS and CPU, added delay.

    `rounds` bursts on the same cluster; the row has each value's median over the rounds
    (`statuses`, `failed` and `first_error` from the worst round)."""
    _raise_open_files(4 * streams + 1024)  # children (the gateway) inherit it
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis", appendonly=False).start()
        cluster = Cluster(redis.url, "bench", Path(tmp))
        try:
            cluster.start_worker(
                "mock", max_batch=streams, mock_tokens_per_s=tokens_per_s, log_level="warning"
            )
            gateway = cluster.start_gateway(
                max_concurrent=streams,
                max_queue=streams,
                queue_timeout=60,
                log_level="warning",
            )
            cluster.wait_ready(gateway)
            asyncio.run(run_raw_streams(gateway.url, 8, _body(5)))  # warm-up
            idle_rss = psutil.Process(gateway.pid).memory_info().rss
            runs = [
                _many_round(gateway.url, gateway.pid, streams, tokens, tokens_per_s)
                for _ in range(rounds)
            ]
        finally:
            cluster.stop()
            redis.stop()
    worst = max(runs, key=lambda r: r["failed"])
    row: dict[str, Any] = {
        "scenario": "many",
        "streams": streams,
        "tokens_per_stream": tokens,
        "engine_tokens_per_s": tokens_per_s,
        "rounds": rounds,
        "ok": min(r["ok"] for r in runs),
        "failed": worst["failed"],
        "statuses": worst["statuses"],
        "first_error": worst["first_error"],
        "complete": min(r["complete"] for r in runs),
        "gateway_rss_idle_mb": round(idle_rss / 2**20, 1),
    }
    for key in runs[0]:
        if key not in row and key not in ("statuses", "first_error"):
            row[key] = _median(runs, key)
    row["added_p99_ms_runs"] = "/".join(str(r["added_p99_ms"]) for r in runs)
    return [row]
