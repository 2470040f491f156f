"""`chatstream up`: the local all-in-one cluster as child processes.

Starts an embedded Redis (unless `--redis-url` is given; with `--redis-cluster`, a throwaway
3-primary Redis Cluster without persistence, to try cluster mode), the workers (`--workers
auto`: one per visible CUDA device, else one on CPU) and one gateway; prints the URL; restarts
a child that dies, with backoff; on Ctrl-C or SIGTERM stops every child and the embedded Redis.
"""

from __future__ import annotations

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
        for i, device in enumerate(worker_devices(s)):
            env = settings_env(
                {
                    **worker_values,
                    "device": device,
                    "worker_id": f"{s.worker_id or socket.gethostname()}-{i}",
                }
            )
            self.children.append(Child(f"worker-{i}", [*cli, "worker"], env))
        gateway_values = {**fields_of(GatewaySettings, s), "redis_url": redis_url}
        self.children.append(Child("gateway", [*cli, "gateway"], settings_env(gateway_values)))
        for child in self.children:
            child.start()
        self._wait_ready()
        return self.url

    def _wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping.is_set():
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
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
    cluster = LocalCluster(settings)

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
            cluster.supervise()
    finally:
        cluster.stop()
    return 0
