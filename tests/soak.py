"""A soak: steady streaming load through several gateways while processes are killed, frozen
and cut off, with clients that resume like real ones. Used by tests/faults/test_soak.py (short)
and `python -m bench --scenarios soak` (long).

Every stream ends in exactly one class:
- exact: it ended with `length` and its text is the mock model's reply, byte for byte;
- explicit error: the client was told (an error event, an error status, or a connection that
  failed and could not be resumed);
- silently truncated: it ended with a finish reason but the text is wrong. Must be 0.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import redis as syncredis

from tests.cluster import Cluster, Proc, wait_until
from tests.sse import Stream, body, expected, open_stream

RESUMABLE_CODES = {"no_worker", "redis_unavailable", "stream_stalled", "queue_timeout",
                   "stream_truncated", "draining"}
WORKER = {"mock_tokens_per_s": 40, "max_batch": 16, "job_claim_idle": 1.0, "worker_ttl": 1.0,
          "heartbeat_interval": 0.2}
GATEWAY = {"queue_timeout": 30, "no_worker_timeout": 10}


@dataclass
class SoakReport:
    """What a soak saw."""

    seconds: float = 0.0
    streams: int = 0
    exact: int = 0
    explicit_errors: int = 0
    silently_truncated: int = 0
    resumes: int = 0
    faults: Counter = field(default_factory=Counter)
    error_codes: Counter = field(default_factory=Counter)
    settled: bool = False
    truncated_examples: list[str] = field(default_factory=list)
    slowest: list[tuple[float, str | None]] = field(default_factory=list)

    def row(self) -> dict:
        return {
            "seconds": round(self.seconds, 1), "streams": self.streams, "exact": self.exact,
            "explicit_errors": self.explicit_errors,
            "silently_truncated": self.silently_truncated, "resumes": self.resumes,
            "faults": dict(self.faults), "error_codes": dict(self.error_codes),
            "settled": self.settled, "slowest_s": self.slowest,
        }


class Soak:
    """Gateways, workers and clients on one Redis; faults injected at random."""

    def __init__(self, cluster: Cluster, *, gateways: int = 3, workers: int = 2,
                 clients: int = 12, seed: int = 1) -> None:
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.gateways: list[Proc] = [cluster.start_gateway(**GATEWAY) for _ in range(gateways)]
        self.workers: list[Proc] = [cluster.start_worker("mock", **WORKER)
                                    for _ in range(workers)]
        cluster.wait_ready(self.gateways[0], workers=workers)
        self.clients = clients
        self.report = SoakReport()
        self.stop = threading.Event()
        self._serial = 0
        self._restarts: list[threading.Thread] = []

    # --- load --------------------------------------------------------------------------------
    def urls(self) -> list[str]:
        with self.lock:
            return [g.url for g in self.gateways if g.alive()]

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        while not self.stop.is_set():
            with self.lock:
                self._serial += 1
                serial = self._serial
            prompt, n = f"soak {index}-{serial}", rng.randint(40, 120)
            began = time.monotonic()
            outcome, code = self._one(prompt, n, rng)
            took = time.monotonic() - began
            with self.lock:
                self.report.streams += 1
                self.report.slowest = sorted([*self.report.slowest, (round(took, 1), code)],
                                             reverse=True)[:3]
                if outcome == "exact":
                    self.report.exact += 1
                elif outcome == "error":
                    self.report.explicit_errors += 1
                    self.report.error_codes[code or "connection"] += 1
                else:
                    self.report.silently_truncated += 1
                    self.report.truncated_examples.append(f"{prompt} ({n}): {code}")

    def _one(self, prompt: str, n: int, rng: random.Random) -> tuple[str, str | None]:
        """Stream one reply to the end, resuming on another gateway when cut off."""
        text, last_id, code = "", None, None
        for attempt in range(6):
            if attempt and self.stop.is_set() and attempt > 2:
                break  # winding down: a stream still cut off now counts as an explicit error
            if attempt:
                time.sleep(rng.uniform(0.1, 1.0))
                if last_id is not None:
                    with self.lock:
                        self.report.resumes += 1
            urls = self.urls()
            if not urls:
                continue
            rec = Stream()
            try:
                with open_stream(rng.choice(urls), body(prompt, n), last_event_id=last_id,
                                 timeout=20) as (resp, rec):
                    if rec.status == 200:
                        rec.feed()
            except httpx.HTTPError as exc:
                code = type(exc).__name__  # cut off: resume with what it saw
            text += rec.text
            last_id = rec.last_id or last_id
            if rec.finish is not None:
                exact = rec.finish == "length" and text == expected(prompt, n)
                return ("exact" if exact else "truncated"), rec.finish
            if rec.done and not rec.errors:
                return "truncated", "[DONE] without a finish reason or an error"
            if rec.status in (400, 404, 410):
                return "error", rec.error_code  # nothing left to resume
            code = rec.error_code or code
            if rec.errors and code not in RESUMABLE_CODES:
                return "error", code
        return "error", code

    # --- faults ------------------------------------------------------------------------------
    def _faults(self, every: tuple[float, float]) -> None:
        """Every few seconds one fault; each kind in turn, in a shuffled order per round."""
        kinds: list[str] = []
        while not self.stop.wait(self.rng.uniform(*every)):
            if not kinds:
                kinds = ["kill_worker", "kill_gateway", "pause_worker", "kill_pubsub"]
                self.rng.shuffle(kinds)
            kind = kinds.pop()
            try:
                getattr(self, kind)()
                self.report.faults[kind] += 1
            except Exception as exc:  # noqa: BLE001 - a failed fault is reported, not fatal
                self.report.faults[f"{kind}_failed:{type(exc).__name__}"] += 1

    def kill_worker(self) -> None:
        victim = self.rng.choice(self.workers)
        victim.kill()
        with self.lock:
            self.workers.remove(victim)
            self.workers.append(self.cluster.start_worker("mock", **WORKER))

    def kill_gateway(self) -> None:
        """SIGKILL a gateway; a new one starts on its port in the background (as a supervisor
        would restart it), while the faults go on."""
        with self.lock:
            alive = [g for g in self.gateways if g.alive()]
        if len(alive) < 2:
            return
        victim = self.rng.choice(alive)
        victim.kill()

        def restart() -> None:
            replacement = self.cluster.start_gateway(port=victim.port, **GATEWAY)
            with self.lock:
                self.gateways[self.gateways.index(victim)] = replacement

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        self._restarts.append(thread)

    def pause_worker(self) -> None:
        victim = self.rng.choice(self.workers)
        os.kill(victim.pid, signal.SIGSTOP)
        time.sleep(self.rng.uniform(0.5, 2.0))
        os.kill(victim.pid, signal.SIGCONT)

    def kill_pubsub(self) -> None:
        client = syncredis.Redis.from_url(self.cluster.redis_url)
        try:
            client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        finally:
            client.close()

    # --- run ---------------------------------------------------------------------------------
    def run(self, seconds: float, fault_every: tuple[float, float] = (1.5, 3.5)) -> SoakReport:
        started = time.monotonic()
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                   for i in range(self.clients)]
        faults = threading.Thread(target=self._faults, args=(fault_every,), daemon=True)
        for t in threads:
            t.start()
        faults.start()
        self.stop.wait(seconds)
        self.stop.set()
        faults.join(30)
        for t in [*threads, *self._restarts]:
            t.join(120)
        self.report.seconds = time.monotonic() - started
        self.report.settled = self.settle()
        return self.report

    def settle(self, within: float = 60) -> bool:
        """Permits, queue depth and the worker list return to their true values."""
        live = {w.settings["worker_id"] for w in self.workers if w.alive()}

        def true_values() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(self.urls()[0] + "/admin/status", timeout=5).json()
                return (status["running"] == 0 and status["queue_depth"] == 0
                        and {w["id"] for w in status["workers"]} == live)
            return False

        try:
            wait_until(true_values, within, interval=0.25, what="the true values")
        except TimeoutError:
            return False
        return True
