"""An autoscaling run with real processes, as KEDA would drive it on Kubernetes. Used by
tests/faults/test_autoscale.py (short form) and `python -m bench --scenarios autoscale`
(the full ramp).

- `Scaler` applies KEDA's rule to each model's worker pool every `interval` seconds, reading
  the gateway's `/metrics` as KEDA's Prometheus scaler reads Prometheus: the model's demand is
  `chatstream_queue_depth{model} + chatstream_running{model}` (the query of
  deploy/kubernetes/worker-*.yaml), and `replicas = ceil(demand / target)` clamped to
  [min, max], where target is a worker's `--max-batch`. As KEDA does, a pool above zero goes
  to zero only after its demand stayed 0 for `cooldown` seconds, and as the HPA's scale-down
  behaviour does, it removes at most one worker per `down_every` seconds, and never below
  the highest count wanted within `stabilization` seconds. A new worker is a `mock` worker with
  a fake cold start (`CHATSTREAM_TEST_COLD_START`, worker/engine/faults.py); a removed one gets
  SIGTERM and drains.
- `Ramp` streams to the bursty model from 0 up to `peak` concurrent clients, holds, and back
  to 0, while `steady` clients stream to the other model the whole time. Every stream is
  checked: HTTP 200, no error event, `length`, and exactly the mock model's text.

One machine plays a whole cluster here, so what would run elsewhere runs at a low CPU
priority (nice 15): the bursty model's workers (GPU nodes of their own in production), the
burst's clients (a process of its own: the internet) and the gateway the burst comes in
through. Production gateways scale on CPU (an HPA), so a burst gets gateway CPU of its own;
one gateway process relaying both models on these shared cores would measure the cores. Both
gateways share Redis: the models' queues, semaphore lines, registries and figures, which is
what the steady model's time to first token checks (the scaler reads the steady gateway's
`/metrics`, so the bursty model's demand is seen across gateways too). The steady gateway,
the steady model's worker and the steady clients run at normal priority. With nice 10 and one
gateway for both models, the steady model's TTFT p99 during the burst was 1.5-1.6x its
baseline on two cores; as set here, 0.9-1.5x at load averages 4-7 (docs/performance.md).
Nice 19 starves the burst under other load (a first worker after 20 s in the short form).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import Cluster, Proc, wait_until
from tests.sse import CHAT, expected

COLD_START_ENV = "CHATSTREAM_TEST_COLD_START"
ELSEWHERE_NICE = 15  # the priority of what would run on other machines (module docstring)


@dataclass
class Pool:
    """One model's workers, as one Deployment with its ScaledObject."""

    model: str
    min_replicas: int
    max_replicas: int
    target: int  # a worker's --max-batch: KEDA's threshold
    tokens_per_s: float
    nice: int = 0  # > 0: its workers would run on other machines (module docstring)
    active: list[Proc] = field(default_factory=list)  # starting or serving
    removed: list[Proc] = field(default_factory=list)  # SIGTERMed: draining or gone
    wanted: list[tuple[float, int]] = field(default_factory=list)  # (time, desired)
    replicas: list[tuple[float, int]] = field(default_factory=list)
    peak_queue: int = 0
    last_active: float = float("-inf")
    last_down: float = float("-inf")
    first_demand: float | None = None
    first_worker: float | None = None
    drained_streaming: int = 0  # workers SIGTERMed while they ran streams
    stopped_starting: set[str] = field(default_factory=set)  # SIGTERMed before they were live


def metric_values(text: str, name: str) -> dict[str, float]:
    """model -> value of a per-model gauge in a /metrics text."""
    return {s.labels["model"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name and "model" in s.labels}


class Scaler(threading.Thread):
    """KEDA's rule over the pools, every `interval` seconds (module docstring)."""

    def __init__(self, cluster: Cluster, gateway: Proc, pools: list[Pool], *,
                 cold_start: str = "10-20", interval: float = 1.0, cooldown: float = 5.0,
                 down_every: float = 2.0, stabilization: float = 3.0) -> None:
        super().__init__(daemon=True, name="scaler")
        self.cluster, self.gateway, self.pools = cluster, gateway, pools
        self.cold_start, self.interval, self.cooldown = cold_start, interval, cooldown
        self.down_every, self.stabilization = down_every, stabilization
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self.started = time.monotonic()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - reported by the test, not swallowed
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def step(self) -> None:
        text = httpx.get(self.gateway.url + "/metrics", timeout=5).text
        queue = metric_values(text, "chatstream_queue_depth")
        running = metric_values(text, "chatstream_running")
        running_by_worker = {w["id"]: w["running"] for w in httpx.get(
            self.gateway.url + "/admin/status", timeout=5).json()["workers"]}
        live = set(running_by_worker)
        now = time.monotonic()
        for pool in self.pools:
            waiting = int(queue.get(pool.model, 0))
            demand = waiting + int(running.get(pool.model, 0))
            pool.peak_queue = max(pool.peak_queue, waiting)
            if demand > 0:
                pool.last_active = now
                pool.first_demand = pool.first_demand or now
            if pool.first_worker is None and pool.first_demand is not None and any(
                    p.settings["worker_id"] in live for p in pool.active):
                pool.first_worker = now
            self._scale(pool, self.desired(pool, demand, now), now, running_by_worker)

    def desired(self, pool: Pool, demand: int, now: float) -> int:
        want = min(pool.max_replicas, max(pool.min_replicas, math.ceil(demand / pool.target)))
        if demand == 0 and now - pool.last_active < self.cooldown:
            want = max(want, min(1, len(pool.active)))  # still active for KEDA: HPA min 1
        pool.wanted.append((now, want))
        recent = [w for t, w in pool.wanted if now - t <= self.stabilization]
        return max(recent)

    def _scale(self, pool: Pool, want: int, now: float, running: dict[str, int]) -> None:
        pool.active = [p for p in pool.active if p.alive()]  # a crash is a removal too
        while len(pool.active) < want:
            index = len(pool.active) + len(pool.removed)
            pool.active.append(self.cluster.start_worker(
                "mock", served_model_name=pool.model, max_batch=pool.target,
                mock_tokens_per_s=pool.tokens_per_s, worker_id=f"{pool.model}-{index}",
                env={COLD_START_ENV: self.cold_start}, nice=pool.nice))
        if len(pool.active) > want and now - pool.last_down >= self.down_every:
            victim = pool.active.pop()  # the newest: a starting one before a serving one
            victim.terminate()
            pool.removed.append(victim)
            victim_id = victim.settings["worker_id"]
            if victim_id not in running:
                pool.stopped_starting.add(victim_id)
            elif running[victim_id]:
                pool.drained_streaming += 1
            pool.last_down = now
        pool.replicas.append((now, len(pool.active)))

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)


@dataclass
class Result:
    """One stream as its client saw it."""

    model: str
    status: int
    ok: bool  # 200, `length`, exactly the expected text, no error event
    ttft: float | None
    started: float
    problem: str = ""


def one_stream(url: str, model: str, content: str, tokens: int) -> Result:
    """Stream one chat completion; check it against the mock model's reply."""
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "stream": True, "max_tokens": tokens}
    started = time.monotonic()
    text, finish, errors, ttft, status = "", None, [], None, 0
    try:
        with httpx.stream("POST", url + CHAT, json=body, timeout=120) as resp:
            status = resp.status_code
            if status != 200:
                resp.read()
                return Result(model, status, False, None, started, resp.text[:200])
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = orjson.loads(line[6:])
                if "error" in data:
                    errors.append(data["error"].get("code"))
                    continue
                for choice in data.get("choices", []):
                    piece = choice["delta"].get("content")
                    if piece:
                        ttft = ttft if ttft is not None else time.monotonic() - started
                        text += piece
                    finish = choice.get("finish_reason") or finish
    except httpx.HTTPError as exc:
        return Result(model, status, False, ttft, started, f"{type(exc).__name__}: {exc}")
    exact = text == expected(content, tokens)
    ok = not errors and finish == "length" and exact
    problem = "" if ok else f"finish={finish} errors={errors} exact={exact}"
    return Result(model, status, ok, ttft, started, problem)


class Client(threading.Thread):
    """Streams to one model back to back until told to stop (its last stream finishes)."""

    def __init__(self, url: str, model: str, name: str, tokens: int,
                 results: list[Result]) -> None:
        super().__init__(daemon=True, name=name)
        self.url, self.model, self.tokens, self.results = url, model, tokens, results
        self.stopping = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            self.results.append(one_stream(self.url, self.model, f"{self.name} {n}", self.tokens))
            n += 1


@dataclass
class AutoscaleReport:
    """What an autoscaling run saw (`row()` is the bench's and the test's summary)."""

    seconds: float
    steady: list[Result]
    burst: list[Result]
    baseline_ttft: list[float]  # the steady model's, without a burst: before and after it
    pools: dict[str, Pool]
    exit_codes: dict[str, int | None]
    scaler_errors: list[str]
    ramp: tuple[float, float]  # from the burst's start until the bursty model is back at 0

    @staticmethod
    def p99(values: list[float]) -> float | None:
        if not values:
            return None
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    @property
    def ramp_ttft(self) -> list[float]:
        """The steady model's TTFTs while the burst ran."""
        start, end = self.ramp
        return [r.ttft for r in self.steady if r.ttft is not None and start <= r.started < end]

    def row(self) -> dict[str, Any]:
        burst = self.pools["burst"]
        first = (None if burst.first_worker is None or burst.first_demand is None
                 else round(burst.first_worker - burst.first_demand, 1))
        base, ramp = self.p99(self.baseline_ttft), self.p99(self.ramp_ttft)
        # A worker stopped before it was live drains nothing: exit 0, or killed by SIGTERM's
        # default action while Python was still starting (as a container that is not ready).
        starting = set().union(*(p.stopped_starting for p in self.pools.values()))
        return {
            "seconds": round(self.seconds, 1),
            "streams_served": sum(r.ok for r in self.steady + self.burst),
            "burst_streams": len(self.burst), "steady_streams": len(self.steady),
            "failed": sum(not r.ok for r in self.steady + self.burst),
            "non_200": sum(r.status != 200 for r in self.steady + self.burst),
            "time_to_first_worker_s": first,
            "peak_queue_depth": burst.peak_queue,
            "peak_replicas": max((n for _, n in burst.replicas), default=0),
            "final_replicas": burst.replicas[-1][1] if burst.replicas else 0,
            "steady_ttft_p99_baseline_ms": None if base is None else round(base * 1000, 1),
            "steady_ttft_p99_ramp_ms": None if ramp is None else round(ramp * 1000, 1),
            "workers_stopped": len(self.exit_codes),
            "drained_while_streaming": burst.drained_streaming,
            "stopped_while_starting": len(starting),
            "unclean_exits": {k: v for k, v in self.exit_codes.items()
                              if v != 0 and not (k in starting and v == -signal.SIGTERM)},
        }


def burst_load(url: str, model: str, peak: int, ramp_up_s: float, ramp_down_s: float,
               tokens: int, nice: int, at_peak, go_down, out) -> None:  # noqa: ANN001
    """The burst's clients, in a process of their own (spawned): 0 -> `peak` clients over
    `ramp_up_s`, `at_peak` set, back to 0 over `ramp_down_s` once `go_down` is set; the
    results go to `out`."""
    os.nice(nice)
    results: list[Result] = []
    clients = []
    for i in range(peak):
        client = Client(url, model, f"burst-{i}", tokens, results)
        client.start()
        clients.append(client)
        time.sleep(ramp_up_s / peak)  # the ramp's pace
    at_peak.set()
    go_down.wait()
    for client in reversed(clients):
        client.stopping.set()
        time.sleep(ramp_down_s / peak)  # the ramp's pace
    for client in clients:
        client.join(120)
    out.put(results)


@dataclass
class Ramp:
    """The scenario: a steady model and a bursty one, both autoscaled (module docstring)."""

    peak: int = 100  # concurrent streams on the bursty model at the top
    burst_batch: int = 16  # the bursty model's --max-batch (KEDA's threshold)
    burst_max_replicas: int = 8
    burst_tokens: int = 40
    burst_tokens_per_s: float = 20.0
    steady_clients: int = 2
    steady_tokens: int = 4  # short streams back to back: many TTFT samples for the p99
    warmup_s: float = 3.0
    baseline_s: float = 8.0  # before the burst, and again after it
    ramp_up_s: float = 10.0
    hold_s: float = 10.0  # at the peak, once a burst worker serves
    ramp_down_s: float = 5.0
    cold_start: str = "10-20"  # every worker's fake start-up time, seconds
    cooldown_s: float = 5.0  # the Scaler's (module docstring)
    down_every_s: float = 2.0
    stabilization_s: float = 3.0
    settle_timeout: float = 120.0

    def run(self, cluster: Cluster) -> AutoscaleReport:
        began = time.monotonic()
        admission = {"models": ["steady", "burst"], "cold_start_timeout": 90,
                     "max_queue": 4 * self.peak, "queue_timeout": 90}
        gateway = cluster.start_gateway(**admission)
        burst_gateway = cluster.start_gateway(nice=ELSEWHERE_NICE, **admission)
        pools = [Pool("steady", 1, 2, 4, 50.0),
                 Pool("burst", 0, self.burst_max_replicas, self.burst_batch,
                      self.burst_tokens_per_s, nice=ELSEWHERE_NICE)]
        scaler = Scaler(cluster, gateway, pools, cold_start=self.cold_start,
                        cooldown=self.cooldown_s, down_every=self.down_every_s,
                        stabilization=self.stabilization_s)
        scaler.start()
        steady: list[Result] = []
        clients: list[Client] = []
        spawn = multiprocessing.get_context("spawn")
        at_peak, go_down, out = spawn.Event(), spawn.Event(), spawn.Queue()
        load = spawn.Process(target=burst_load, daemon=True, args=(
            burst_gateway.url, "burst", self.peak, self.ramp_up_s, self.ramp_down_s,
            self.burst_tokens, ELSEWHERE_NICE, at_peak, go_down, out))
        burst: list[Result] = []
        try:
            wait_until(lambda: self._serving(gateway, "steady"), 60, interval=0.2,
                       what="the steady model's first worker")
            clients = [Client(gateway.url, "steady", f"steady-{i}", self.steady_tokens, steady)
                       for i in range(self.steady_clients)]
            for c in clients:
                c.start()
            time.sleep(self.warmup_s + self.baseline_s)  # the scenario's pace
            ramp_start = time.monotonic()
            load.start()
            assert at_peak.wait(self.ramp_up_s + 60), "the burst did not reach its peak"
            wait_until(lambda: pools[1].first_worker is not None, 120, interval=0.2,
                       what="the first burst worker")
            time.sleep(self.hold_s)  # the ramp holds at its peak
            go_down.set()
            burst = out.get(timeout=180)
            load.join(30)
            wait_until(lambda: not pools[1].active and not any(
                p.alive() for p in pools[1].removed), self.settle_timeout, interval=0.5,
                what="the bursty model to scale down to 0 workers")
            ramp_end = time.monotonic()
            time.sleep(self.baseline_s)  # the second baseline window
        finally:
            go_down.set()
            for c in clients:
                c.stopping.set()
            for c in clients:
                c.join(60)
            scaler.stop()
            if load.is_alive():
                load.kill()
        exit_codes = {}
        for pool in pools:
            for proc in pool.removed:
                try:
                    exit_codes[proc.settings["worker_id"]] = proc.wait(30)
                except Exception:  # noqa: BLE001 - still running: reported as None
                    exit_codes[proc.settings["worker_id"]] = None
        # The machine is shared: the baseline is the steady model's TTFT without a burst both
        # before and after it, so a change of the machine's load during the run shows in both.
        baseline = [r.ttft for r in steady if r.ttft is not None and (
            ramp_start - self.baseline_s <= r.started < ramp_start or r.started >= ramp_end)]
        return AutoscaleReport(time.monotonic() - began, steady, burst, baseline,
                               {p.model: p for p in pools}, exit_codes, scaler.errors,
                               (ramp_start, ramp_end))

    @staticmethod
    def _serving(gateway: Proc, model: str) -> bool:
        status = httpx.get(gateway.url + "/admin/status", timeout=5).json()
        return any(m["name"] == model and m["serving"] for m in status["models"])
