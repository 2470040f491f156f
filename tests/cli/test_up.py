"""`chatstream up`: starts an embedded Redis, workers and a gateway; serves; stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import openai
import psutil
import pytest

from chatstream_cluster.shared.redis_server import free_port
from tests.cluster import ROOT, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def up(tmp_path, request):  # noqa: ANN001, ANN201
    """`chatstream up` with 2 mock workers; `parametrize("up", [[flags]], indirect=True)` adds
    flags."""
    port = free_port()
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatstream_cluster.cli",
            "up",
            "--model",
            "mock",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
            "--workers",
            "2",
            "--mock-tokens-per-s",
            "100",
            "--heartbeat-interval",
            "0.2",
            "--worker-ttl",
            "1",
            *getattr(request, "param", []),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "CHATSTREAM_LOG_FORMAT": "text"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: b"is up: " + url.encode() in (tmp_path / "up.log").read_bytes(),
            60,
            what="the URL to be printed",
        )
        yield proc, url, tmp_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


def _descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _workers(url: str) -> list[dict]:
    return httpx.get(url + "/admin/status", timeout=5).json()["workers"]


def _chat_once(url: str, content: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": content}], max_tokens=5
    )
    assert reply.usage.completion_tokens == 5


def _stop_and_check_children_exit(proc: subprocess.Popen, children: list[int]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(40) == 0
    wait_until(
        lambda: (
            not any(
                psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                for p in children
            )
        ),
        10,
        what="every child to exit",
    )


def test_up_serves_and_stops_with_no_leftover_process(up) -> None:  # noqa: ANN001
    proc, url, tmp_path = up
    _chat_once(url, "hi")
    children = _descendants(proc.pid)
    assert len(children) >= 4  # redis, 2 workers, gateway
    assert (tmp_path / "data" / "redis").is_dir()  # append-only data folder
    _stop_and_check_children_exit(proc, children)


def test_up_restarts_a_dead_worker_and_keeps_serving(up) -> None:  # noqa: ANN001
    proc, url, _ = up
    wait_until(lambda: len(_workers(url)) == 2, 30, what="two workers")
    victim = _workers(url)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "still there?"}], max_tokens=5
    )
    assert reply.usage.completion_tokens == 5
    wait_until(
        lambda: any(w["id"] == victim["id"] and w["pid"] != victim["pid"] for w in _workers(url)),
        30,
        interval=0.2,
        what="the worker to be restarted",
    )
    assert proc.poll() is None


@pytest.mark.parametrize("up", [["--redis-cluster"]], indirect=True)
def test_up_with_an_embedded_redis_cluster(up) -> None:  # noqa: ANN001
    proc, url, _ = up
    _chat_once(url, "sharded")
    children = _descendants(proc.pid)
    titles = {p: " ".join(psutil.Process(p).cmdline()) for p in children}
    servers = [p for p, title in titles.items() if "[cluster]" in title]  # the server's title
    assert len(servers) == 3  # three primaries
    _stop_and_check_children_exit(proc, children)
