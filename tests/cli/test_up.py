"""`chatstream up`: starts an embedded Redis, workers and a gateway; serves; stops cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import redis as syncredis

from chatstream_cluster.shared.redis_server import free_port
from tests.cluster import ROOT, wait_until

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def run_up(tmp_path: Path, env: dict[str, str] | None = None,
           flags: tuple[str, ...] = ()) -> Iterator[tuple]:
    """`chatstream up` (mock model, two workers) with `env` added; yields (process, URL,
    tmp_path) once it printed its URL."""
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
            *flags,
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "CHATSTREAM_LOG_FORMAT": "text", **(env or {})},
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


@pytest.fixture
def up(tmp_path, request):  # noqa: ANN001, ANN201
    """`chatstream up` with 2 mock workers; `parametrize("up", [[flags]], indirect=True)` adds
    flags."""
    with run_up(tmp_path, flags=tuple(getattr(request, "param", ()))) as running:
        yield running


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


SECRETS = {"CHATSTREAM_API_KEYS": "sk-up-secret-key", "CHATSTREAM_ADMIN_KEY": "up-admin-secret",
           "CHATSTREAM_SESSION_SECRET": "up-session-secret-0123456789"}


def test_each_child_gets_only_the_secrets_it_uses(tmp_path) -> None:  # noqa: ANN001
    with run_up(tmp_path, SECRETS) as (proc, url, _):
        children = [psutil.Process(pid) for pid in _descendants(proc.pid)]
        by_role: dict[str, list[dict[str, str]]] = {}
        for child in children:
            cmdline = " ".join(child.cmdline())
            server = "redis-server" in cmdline or "valkey-server" in cmdline
            role = ("redis" if server else "gateway" if " gateway" in cmdline
                    else "worker" if " worker" in cmdline else "other")
            by_role.setdefault(role, []).append(child.environ())
        assert len(by_role["worker"]) == 2 and len(by_role["gateway"]) == 1
        assert len(by_role["redis"]) == 1
        for env in by_role["worker"] + by_role["redis"]:
            leaked = {k for k, v in env.items() if v in SECRETS.values()}
            assert leaked == set(), leaked
        gateway_env = by_role["gateway"][0]
        assert {k: gateway_env.get(k) for k in SECRETS} == SECRETS
        assert not any(k.startswith("CHATSTREAM_") for k in by_role["redis"][0])
        # ...and the keys still protect the gateway.
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
        headers = {"Authorization": "Bearer up-admin-secret"}
        status = httpx.get(url + "/admin/status", headers=headers, timeout=5)
        assert status.status_code == 200


def test_the_embedded_redis_has_a_maxmemory_that_never_evicts(up) -> None:  # noqa: ANN001
    proc, _url, _ = up
    redis_proc = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                      if "-server" in " ".join(p.cmdline()))
    port = next(c.laddr.port for c in redis_proc.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN)
    client = syncredis.Redis(port=port)
    try:
        config = client.config_get("maxmemory*")
        assert config["maxmemory"] == str(2 * 1024**3)
        assert config["maxmemory-policy"] == "noeviction"
    finally:
        client.close()


def test_up_serves_two_models_side_by_side(tmp_path, demo_model_dir: str) -> None:  # noqa: ANN001
    """`--worker mock --worker demo`: one worker of each, each served under its own name."""
    cache = str(Path(demo_model_dir).parent)  # the session's demo model: built once
    flags = ("--worker", "mock", "--worker", "demo", "--model-cache-dir", cache)
    with run_up(tmp_path, flags=flags) as (proc, url, _):
        assert b"models: mock (1 worker), demo (1 worker)" in (tmp_path / "up.log").read_bytes()
        listed = httpx.get(url + "/v1/models", timeout=5).json()["data"]
        assert sorted(m["id"] for m in listed) == ["demo", "mock"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        for model in ("mock", "demo"):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert reply.model == model and reply.usage.completion_tokens >= 1
        by_model = {w["model"]: w for w in _workers(url)}
        assert set(by_model) == {"mock", "demo"}
        status = httpx.get(url + "/admin/status", timeout=5).json()
        assert [m["name"] for m in status["models"]] == ["demo", "mock"]
        # The ChatStream endpoints name no model: `up` made the first one the default.
        turn = httpx.post(url + "/chat_stream", json={"user_input": "hi"}, timeout=30)
        assert turn.status_code == 200 and turn.text.endswith("<::EOS::>")
        _stop_and_check_children_exit(proc, _descendants(proc.pid))
