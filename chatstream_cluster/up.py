"""`chatstream up`: the local all-in-one cluster as child processes.

Starts an embedded Redis (unless `--redis-url` is given; with `--redis-cluster`, a throwaway
3-primary Redis Cluster without persistence, to try cluster mode), the workers and one gateway;
prints the URL; restarts a child that dies, with backoff; on Ctrl-C or SIGTERM stops every
child and the embedded Redis.

Workers: `--workers` of `--model` (auto: one per visible CUDA device, else one on CPU), or,
for several models side by side, one `--worker MODEL[:N]` per model (`worker_plan`): each
model is served under its own name, its workers take the visible GPUs in order (`mock`
takes none), and the gateway is told the models (`--models`; the first is the ChatStream
endpoints' `--default-model` unless one is given).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from chatstream_cluster.shared.procs import die_with_parent, settings_env
from chatstream_cluster.shared.redis_local import LocalRedisCluster
from chatstream_cluster.shared.redis_server import RedisServer
from chatstream_cluster.shared.settings import (
    GatewaySettings,
    UpSettings,
    WorkerSettings,
    fields_of,
)

log = logging.getLogger("chatstream.up")
MAX_BACKOFF_S = 30.0


def visible_cuda_devices() -> list[str]:
    """CUDA device indexes this machine shows, without importing torch."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip() and d.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU")]


def worker_devices(settings: UpSettings) -> list[str]:
    """The --device of each worker to start."""
    if settings.workers == "auto":
        gpus = visible_cuda_devices() if settings.model != "mock" else []
        return [f"cuda:{i}" for i in range(len(gpus))] or [settings.device]
    count = int(settings.workers)
    if settings.device.startswith("cuda") and ":" not in settings.device:
        return [f"cuda:{i}" for i in range(count)]
    return [settings.device] * count


@dataclass(frozen=True)
class PlannedWorker:
    """One worker `up` starts: its model (served under that name unless --served-model-name
    applies) and its device."""

    model: str
    device: str


def parse_worker_spec(spec: str) -> tuple[str, int]:
    """`MODEL[:N]` -> (MODEL, N); ValueError when N is not a positive number or MODEL empty."""
    model, colon, count = spec.rpartition(":")
    if not colon or not count.isdigit():  # no count: a model id may hold ':' itself
        model, count = spec, "1"
    if not model.strip() or int(count) < 1:
        raise ValueError(f"--worker {spec!r}: expected MODEL or MODEL:N with N >= 1")
    return model.strip(), int(count)


def worker_plan(settings: UpSettings) -> list[PlannedWorker]:
    """The workers to start: `--workers` of `--model`, or the `--worker MODEL[:N]` groups.
    Raises ValueError for a bad spec, or more GPU workers than visible GPUs."""
    if not settings.worker:
        return [PlannedWorker(settings.model, d) for d in worker_devices(settings)]
    groups = [parse_worker_spec(spec) for spec in settings.worker]
    gpus = visible_cuda_devices() if settings.device == "cpu" else []
    plan, next_gpu = [], 0
    for model, count in groups:
        for _ in range(count):
            if model == "mock" or not gpus:
                device = "cpu" if model == "mock" else settings.device
            elif next_gpu < len(gpus):
                device, next_gpu = f"cuda:{next_gpu}", next_gpu + 1
            else:
                raise ValueError(f"--worker asks for more GPU workers than the {len(gpus)} "
                                 "visible CUDA devices (one worker per GPU)")
            plan.append(PlannedWorker(model, device))
    return plan


def scrub_settings_env() -> None:
    """Drop the `CHATSTREAM_*` variables from this process's environment once the settings are
    read: each child then gets only the settings (and so the secrets) meant for it, through its
    own `env`. The workers and the embedded Redis never see the API keys, the admin key or the
    session secret that `up` was started with; the gateway gets them from its own `env`."""
    for name in [n for n in os.environ if n.startswith("CHATSTREAM_")]:
        del os.environ[name]


@dataclass
class Child:
    """A supervised child process and its restart backoff."""

    name: str
    args: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default_factory=time.monotonic)

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.args,
            env={**os.environ, **self.env},
            preexec_fn=die_with_parent,
            start_new_session=True,  # signals reach children only through `up`, in order
        )
        self.started_at = time.monotonic()
        log.info("started", extra={"child": self.name, "pid": self.process.pid})

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class LocalCluster:
    """Redis + workers + gateway as supervised processes."""

    def __init__(self, settings: UpSettings) -> None:
        self.settings = settings
        self.plan = worker_plan(settings)
        self.redis: RedisServer | LocalRedisCluster | None = None
        self.children: list[Child] = []
        self.stopping = threading.Event()

    @property
    def url(self) -> str:
        host = self.settings.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{self.settings.port}"

    def start(self) -> str:
        """Start everything; returns the gateway URL once it is ready."""
        s = self.settings
        redis_url = s.redis_url
        if not redis_url and s.redis_cluster:
            folder = Path(s.data_dir) / "redis-cluster"
            shutil.rmtree(folder, ignore_errors=True)  # nodes.conf of old ports: start afresh
            self.redis = LocalRedisCluster(folder, primaries=3, replicas=0).start()
            redis_url = self.redis.url
            log.info("embedded redis cluster (no persistence)", extra={"url": redis_url})
        elif not redis_url:
            self.redis = RedisServer(Path(s.data_dir) / "redis", appendonly=True,
                                     maxmemory=s.redis_maxmemory).start()
            redis_url = self.redis.url
            log.info("embedded redis", extra={"url": redis_url})
        cli = [sys.executable, "-m", "chatstream_cluster.cli"]
        worker_values = {**fields_of(WorkerSettings, s), "redis_url": redis_url}
        for i, planned in enumerate(self.plan):
            values = {**worker_values, "model": planned.model, "device": planned.device,
                      "worker_id": f"{s.worker_id or socket.gethostname()}-{i}"}
            if s.worker:  # several models: each served under its own name
                values["served_model_name"] = ""
            self.children.append(Child(f"worker-{i}", [*cli, "worker"], settings_env(values)))
        gateway_values = {**fields_of(GatewaySettings, s), "redis_url": redis_url}
        if s.worker:  # known from the start, so a model still loading is not a 404
            names = list(dict.fromkeys(w.model for w in self.plan))
            gateway_values["models"] = list(dict.fromkeys([*s.models, *names]))
            gateway_values["default_model"] = s.default_model or names[0]
        self.children.append(Child("gateway", [*cli, "gateway"], settings_env(gateway_values)))
        for child in self.children:
            child.start()
        self._wait_ready()
        return self.url

    def served_models(self) -> list[str]:
        """The served names of the planned workers, in order."""
        if not self.settings.worker and self.settings.served_model_name:
            return [self.settings.served_model_name]
        return list(dict.fromkeys(w.model for w in self.plan))

    def _wait_ready(self, timeout: float = 300.0) -> None:
        """Until the gateway is ready and a worker of every planned model serves."""
        deadline = time.monotonic() + timeout
        wanted = set(self.served_models())
        while time.monotonic() < deadline and not self.stopping.is_set():
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as resp:
                    if resp.status == 200 and wanted <= set(json.load(resp).get("models", [])):
                        return
            except OSError:
                pass
            for child in self.children:
                if not child.alive():
                    raise RuntimeError(f"{child.name} exited during start-up")
            self.stopping.wait(0.2)
        if not self.stopping.is_set():
            raise TimeoutError(f"the cluster was not ready within {timeout:g}s")

    def supervise(self) -> None:
        """Restart children that die (backoff 1, 2, 4 ... 30 s) until stop() is called."""
        while not self.stopping.wait(0.5):
            now = time.monotonic()
            for child in self.children:
                if child.alive():
                    if now - child.started_at > 60:
                        child.restarts = 0
                    continue
                if child.next_start == 0.0:
                    delay = min(2.0**child.restarts, MAX_BACKOFF_S)
                    code = child.process.returncode if child.process else None
                    log.warning(
                        "child died; restarting",
                        extra={"child": child.name, "exit_code": code, "in_s": delay},
                    )
                    child.next_start = now + delay
                elif now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    child.start()

    def stop(self) -> None:
        """SIGTERM every child, wait for the drain, SIGKILL stragglers, stop Redis."""
        self.stopping.set()
        # Gateways first (they drain their streams), workers with them; Redis last.
        for child in self.children:
            if child.alive():
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace + self.settings.drain_timeout + 5
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait(5)
        if self.redis is not None:
            self.redis.stop()


def main(settings: UpSettings) -> int:
    """Entry point of `chatstream up`."""
    from chatstream_cluster.gateway.security import check_startup
    from chatstream_cluster.shared.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format, component="up")
    check_startup(settings, warn=False)  # exits 2 before starting anything; the gateway warns
    scrub_settings_env()
    try:
        cluster = LocalCluster(settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def _on_signal(signum: int, _frame: object) -> None:
        cluster.stopping.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        url = cluster.start()
        if not cluster.stopping.is_set():
            print(f"ChatStream Cluster is up: {url}", flush=True)
            pages = [f"{name}: {url}{path}" for name, path, on in (
                ("chat", "/", settings.ui), ("ops", "/admin", settings.ops_page)) if on]
            if pages:
                print("  " + "   ".join(pages), flush=True)
            print(
                f"  OpenAI API: {url}/v1/chat/completions   status: {url}/admin/status", flush=True
            )
            counts = {m: sum(w.model == m for w in cluster.plan) for m in cluster.served_models()}
            if len(counts) > 1:
                print("  models: " + ", ".join(
                    f"{m} ({n} worker{'s' if n > 1 else ''})" for m, n in counts.items()),
                    flush=True)
            cluster.supervise()
    finally:
        cluster.stop()
    return 0
