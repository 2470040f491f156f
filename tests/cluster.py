"""Start real gateway and worker processes for tests, and stop every one of them afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from chatstream_cluster.shared.procs import die_with_parent, settings_env
from chatstream_cluster.shared.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spawner")


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):  # noqa: ANN001, ANN201
    """Poll `predicate` until it returns a truthy value; raise TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(check, within: float, what: str):  # noqa: ANN001, ANN201
    """Poll the async `check` until it returns a truthy value; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {within}s waiting for {what}"
        await asyncio.sleep(0.02)


@dataclass
class Proc:
    """One started `chatstream` process."""

    name: str
    process: subprocess.Popen
    log_path: Path
    port: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> None:
        """SIGTERM: a graceful drain."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Cluster:
    """Gateways and workers on one real Redis, under one key prefix."""

    def __init__(self, redis_url: str, key_prefix: str, tmp_path: Path) -> None:
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []

    def _spawn(self, name: str, command: str, settings: dict[str, Any], port: int = 0,
               env: dict[str, str] | None = None, nice: int = 0) -> Proc:
        values = {
            "redis_url": self.redis_url,
            "key_prefix": self.key_prefix,
            "log_format": "json",
            "log_level": "info",
            **settings,
        }
        env = {**os.environ, **settings_env(values), "HF_HUB_OFFLINE": "1", **(env or {})}
        log_path = self.tmp_path / f"{name}-{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            # PR_SET_PDEATHSIG fires when the *thread* that forked the child ends: fork from
            # one long-lived thread, so a child started from a short-lived test thread (a soak's
            # restart) is not sent SIGTERM when that thread returns.
            process = _SPAWNER.submit(
                subprocess.Popen,
                [sys.executable, "-m", "chatstream_cluster.cli", command],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=(lambda: (die_with_parent(), os.nice(nice))) if nice
                else die_with_parent,
            ).result()
        proc = Proc(name, process, log_path, port, values)
        self.procs.append(proc)
        return proc

    def start_worker(self, model: str = "mock", *, env: dict[str, str] | None = None,
                     nice: int = 0, **settings: Any) -> Proc:
        """A worker (with `env` added to its environment, at CPU priority `nice`); returns
        once it is started, not once it is in the registry (`wait_ready` waits for that)."""
        worker_id = settings.pop("worker_id", f"w{len(self.procs)}-{os.getpid()}")
        proc = self._spawn(
            "worker",
            "worker",
            {"model": model, "worker_id": worker_id, "heartbeat_interval": 0.2, **settings},
            env=env, nice=nice,
        )
        proc.settings["worker_id"] = worker_id
        return proc

    def start_gateway(self, port: int = 0, *, start_within: float = 60, nice: int = 0,
                      **settings: Any) -> Proc:
        """A gateway on `port` (default: a free one), at CPU priority `nice`; returns once
        /healthz answers. No shutdown grace unless asked for: nothing balances load in front of
        a test's gateway."""
        port = port or free_port()
        proc = self._spawn("gateway", "gateway", {"port": port, "shutdown_grace": 0, **settings},
                           port=port, nice=nice)
        wait_until(lambda: self._healthy(proc), start_within, what=f"gateway on port {port}")
        return proc

    def _healthy(self, proc: Proc) -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
        try:
            return httpx.get(proc.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, gateway: Proc, workers: int = 1, timeout: float = 60) -> None:
        """Until the gateway sees `workers` live workers."""

        def ready() -> bool:
            for proc in self.procs:
                if not proc.alive() and proc.name == "worker" and proc.process.returncode != 0:
                    raise RuntimeError(f"worker exited:\n{proc.log()[-3000:]}")
            try:
                body = httpx.get(gateway.url + "/readyz", timeout=2).json()
            except httpx.HTTPError:
                return False
            return body.get("workers", 0) >= workers

        wait_until(ready, timeout, interval=0.1, what=f"{workers} live workers")

    def stop(self) -> None:
        """SIGTERM all, then SIGKILL what is left; no process survives a test."""
        for proc in self.procs:
            proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def mock_gateway(
    redis_url: str, tmp_path: Path, worker: dict[str, Any] | None = None, **settings: Any
) -> Iterator[Proc]:
    """One gateway with `settings` and one mock worker (with `worker` settings) under a fresh
    key prefix, ready to serve; both stopped afterwards. For a module's shared gateway."""
    procs = Cluster(redis_url, "t" + uuid.uuid4().hex[:10], tmp_path)
    try:
        procs.start_worker("mock", **(worker or {}))
        gateway = procs.start_gateway(**settings)
        procs.wait_ready(gateway)
        yield gateway
    finally:
        procs.stop()
