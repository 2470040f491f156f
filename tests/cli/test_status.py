"""`chatstream status` as a real subprocess against a real cluster: table, --json, --watch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from chatstream_cluster.shared.redis_server import free_port
from chatstream_cluster.status import CLEAR, render_table
from tests.cluster import ROOT, wait_until

pytestmark = pytest.mark.slow

COMPARED = ("queue_depth", "waiting_for_permit", "undelivered_jobs", "running", "capacity")
WORKER_COMPARED = ("id", "pid", "host", "model", "device", "running", "max_batch", "draining")


def status_cmd(cluster, *extra: str) -> list[str]:  # noqa: ANN001
    return [sys.executable, "-m", "chatstream_cluster.cli", "status",
            "--redis-url", cluster.redis_url, "--key-prefix", cluster.key_prefix, *extra]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without CHATSTREAM_* settings, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CHATSTREAM_")}, **extra}


def run_status(cluster, *extra: str, env: dict[str, str] | None = None):  # noqa: ANN001, ANN201
    return subprocess.run(status_cmd(cluster, *extra), cwd=ROOT, capture_output=True,
                          text=True, timeout=30, env=clean_env(**(env or {})))


@contextmanager
def generating(url: str) -> Iterator[None]:
    """A long stream that has produced text; the client leaves when the block ends."""
    body = {"model": "mock", "messages": [{"role": "user", "content": "busy"}],
            "stream": True, "max_tokens": 400}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # kept open: closing it early would close the connection
        line = ""
        while '"content":"' not in line or '"content":""' in line:
            line = next(lines)
        yield


def admin_status(gateway) -> dict[str, Any]:  # noqa: ANN001
    return httpx.get(gateway.url + "/admin/status", timeout=5).json()


@pytest.fixture
def busy_cluster(cluster):  # noqa: ANN001, ANN201
    """One worker (max_batch 4), a gateway with --max-concurrent 3, one generation running."""
    worker = cluster.start_worker("mock", mock_tokens_per_s=20, max_batch=4)
    gateway = cluster.start_gateway(max_concurrent=3)
    cluster.wait_ready(gateway)
    with generating(gateway.url):
        wait_until(lambda: _steady(gateway), 5, what="one generation on the worker")
        yield cluster, gateway, worker


def _steady(gateway) -> bool:  # noqa: ANN001
    s = admin_status(gateway)
    return s["running"] == 1 and [w["running"] for w in s["workers"]] == [1]


def test_json_matches_admin_status(busy_cluster) -> None:  # noqa: ANN001
    cluster, gateway, worker = busy_cluster
    done = run_status(cluster, "--json")
    assert done.returncode == 0, done.stderr
    cli = json.loads(done.stdout)
    api = admin_status(gateway)
    assert set(cli) == set(api)
    assert {k: cli[k] for k in COMPARED} == {k: api[k] for k in COMPARED}
    assert cli["capacity"] == 3 and cli["running"] == 1 and cli["queue_depth"] == 0
    strip = [[{k: w[k] for k in WORKER_COMPARED} for w in s["workers"]] for s in (cli, api)]
    assert strip[0] == strip[1]
    assert cli["workers"][0]["id"] == worker.settings["worker_id"]
    assert cli["workers"][0]["pid"] == worker.pid


def test_capacity_is_what_the_gateways_publish_else_derived(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", max_batch=4)
    gateway = cluster.start_gateway(max_concurrent=3)
    cluster.wait_ready(gateway)
    published = json.loads(run_status(cluster, "--json").stdout)
    assert published["capacity"] == 3  # the gateway's --max-concurrent, not the CLI's own flags
    assert [(g["max_concurrent"], g["max_queue"]) for g in published["gateways"]] == [(3, 64)]
    gateway.terminate()  # a clean stop leaves the gateway registry at once
    gateway.wait(30)
    derived = json.loads(run_status(cluster, "--json").stdout)
    assert derived["gateways"] == []
    assert derived["capacity"] == 4  # the worker's --max-batch


def test_table_shows_the_numbers_and_every_worker(busy_cluster) -> None:  # noqa: ANN001
    cluster, _gateway, worker = busy_cluster
    done = run_status(cluster)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "queue_depth 0" in out
    assert "running 1/3" in out
    assert "workers 1" in out
    header = next(line for line in out.splitlines() if line.startswith("ID"))
    assert header.split() == ["ID", "PID", "HOST", "MODEL", "DEVICE", "RUN", "MAX", "WAIT",
                              "KV_TOKENS", "TOK/S", "BEAT_S", "STATE"]
    row = next(line for line in out.splitlines() if line.startswith(worker.settings["worker_id"]))
    cells = row.split()
    assert cells[1] == str(worker.pid)
    assert cells[3:9] == ["mock", "cpu", "1", "4", "0", "-"]  # the mock has no KV cache
    assert cells[-1] == "serving"


def test_watch_redraws_until_stopped(busy_cluster) -> None:  # noqa: ANN001
    cluster, _gateway, worker = busy_cluster
    proc = subprocess.Popen(status_cmd(cluster, "--watch", "--interval", "0.2"), cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env=clean_env())
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    try:
        wait_until(lambda: "".join(out).count(CLEAR) >= 3, 15, what="three screens")
        assert proc.poll() is None, "--watch exited by itself"
    finally:
        proc.terminate()
        proc.wait(10)
        reader.join(5)
    screens = "".join(out).split(CLEAR)[1:]
    assert len(screens) >= 3
    for screen in screens[:3]:  # each redraw is a whole table
        assert "running 1/3" in screen
        assert worker.settings["worker_id"] in screen


def test_watch_json_prints_one_object_per_refresh(busy_cluster) -> None:  # noqa: ANN001
    cluster, _gateway, _worker = busy_cluster
    proc = subprocess.Popen(status_cmd(cluster, "--watch", "--json", "--interval", "0.2"),
                            cwd=ROOT, stdout=subprocess.PIPE, text=True, env=clean_env())
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    try:
        wait_until(lambda: len(lines) >= 2, 15, what="two JSON lines")
    finally:
        proc.terminate()
        proc.wait(10)
        reader.join(5)
    for line in lines[:2]:
        assert json.loads(line)["running"] == 1


def test_unreachable_redis_is_a_clear_error(cluster) -> None:  # noqa: ANN001
    started = time.monotonic()
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    done = subprocess.run([sys.executable, "-m", "chatstream_cluster.cli", "status",
                           "--redis-url", url], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env=clean_env())
    assert done.returncode == 1
    assert "cannot reach Redis" in done.stderr
    assert "Traceback" not in done.stderr
    assert "hunter2" not in done.stderr
    assert time.monotonic() - started < 10


def test_render_table_without_workers() -> None:
    text = render_table({"queue_depth": 2, "waiting_for_permit": 2, "undelivered_jobs": 0,
                         "running": 0, "capacity": 0, "gateways": [], "workers": []})
    assert "queue_depth 2" in text and "running 0/0" in text
    assert "(no live worker)" in text


def test_render_table_has_a_row_per_model() -> None:
    models = [
        {"name": "qwen-7b", "queue_depth": 5, "waiting_for_permit": 4, "undelivered_jobs": 1,
         "running": 16, "capacity": 16, "workers": 2, "serving": 1, "waiting_in_workers": 3,
         "tokens_per_s": 812.5},
        {"name": "cold", "queue_depth": 2, "waiting_for_permit": 2, "undelivered_jobs": 0,
         "running": 0, "capacity": 0, "workers": 0, "serving": 0, "waiting_in_workers": 0,
         "tokens_per_s": 0.0},
    ]
    text = render_table({"queue_depth": 7, "waiting_for_permit": 6, "undelivered_jobs": 1,
                         "running": 16, "capacity": 16, "gateways": [], "workers": [],
                         "models": models})
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    assert rows["MODEL"] == ["QUEUE", "PERMIT", "UNREAD", "RUN", "CAP", "WORKERS", "WAIT",
                             "TOK/S"]
    assert rows["qwen-7b"] == ["5", "4", "1", "16", "16", "1/2", "3", "812.5"]
    assert rows["cold"] == ["2", "2", "0", "0", "0", "0/0", "0", "0.0"]
