"""Fixtures of the gateway tests: a user's own FastAPI app (ChatStreamCluster) under uvicorn."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatstream_cluster.shared.procs import die_with_parent, settings_env
from chatstream_cluster.shared.redis_server import free_port
from tests.cluster import ROOT, Proc, wait_until


@pytest.fixture
def start_app(cluster, redis_url: str, key_prefix: str, tmp_path: Path):  # noqa: ANN001, ANN201
    """Start an app module (default tests/gateway/library_app.py) under real uvicorn with these
    gateway settings (`CHATSTREAM_*`) and extra environment; wait until its /get_load, asked
    with `probe_headers`, lists `workers` live workers."""

    def start(workers: int = 1, *, module: str = "tests.gateway.library_app:app",
              env: dict[str, str] | None = None, probe_headers: dict[str, str] | None = None,
              **settings: Any) -> Proc:
        port = free_port()
        values = {"redis_url": redis_url, "key_prefix": key_prefix,
                  "session_secret": "library-test-secret", **settings}
        name = module.split(":")[0].rsplit(".", 1)[-1]
        log_path = tmp_path / f"{name}-{port}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", module, "--host", "127.0.0.1",
                 "--port", str(port)],
                cwd=ROOT, env={**os.environ, **settings_env(values), **(env or {})},
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            )
        app = Proc(name, process, log_path, port, values)
        cluster.procs.append(app)  # stopped with the cluster

        def ready() -> bool:
            if not app.alive():
                raise RuntimeError(f"{name} exited:\n{app.log()[-3000:]}")
            try:
                load = httpx.get(app.url + "/get_load", headers=probe_headers, timeout=5).json()
            except httpx.HTTPError:
                return False
            return len(load.get("chatstream_workers", [])) >= workers

        wait_until(ready, 90, interval=0.1, what=f"{name} with live workers")
        return app

    return start
