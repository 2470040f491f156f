"""Run the docs' code blocks against a real cluster.

Which blocks run: every ```bash, sh, shell, zsh, console (its `$ ` lines) and python block,
and the new side of every ```diff block (as Python), unless the line right before the fence is
`<!-- docs-test: skip: <reason> -->`. Identical blocks run once.

How they run, in a fresh temporary folder:
- addresses: `127.0.0.1:8000` and `localhost:8000` are an open gateway, `gateway:8000` a
  gateway with an API key and an admin key; every `redis://` / `rediss://` URL is the test's
  Redis. Two mock workers serve both gateways, one as model `mock` and one as
  `demo` (the ChatStream endpoints' default);
- environment: the project's venv first on PATH (`python`, `chatstream`); `KEY` and
  `CHATSTREAM_ADMIN_KEY` are that gateway's keys, `SECRET` a session secret, and
  `CHATSTREAM_REDIS_URL` / `CHATSTREAM_KEY_PREFIX` name the test cluster, and
  `CHATSTREAM_DEFAULT_MODEL` its ChatStream endpoints' model (`demo`, as its gateways have);
- shell: `bash -e -o pipefail`, with `curl` failing on an HTTP error (`--fail-with-body`), so
  a 401 or a 503 fails the block like a non-zero exit;
- Python: `python block.py`. A block that builds a FastAPI `app` is served with uvicorn, and if
  it routes `/chat_stream`, one chat turn must stream to its `<::EOS::>` end (and a callback
  that prints its message must print `success`).
A block that runs past 60 s fails: mark a block that starts a server and waits as skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from chatstream_cluster.shared.procs import die_with_parent
from chatstream_cluster.shared.redis_server import free_port
from tests.cluster import wait_until
from tests.docs.markdown_doc import read_doc

KINDS = {"bash": "bash", "sh": "bash", "shell": "bash", "zsh": "bash", "console": "console",
         "python": "python", "py": "python", "diff": "diff"}
TIMEOUT_S = 60
CURL = 'curl() { command curl --fail-with-body --silent --show-error --max-time 30 "$@"; }\n'
EOS = "<::EOS::>"
DEBIAN_TOOLS = ("curl", "openssl")  # what the blocks use that scripts/install_test_deps.sh installs


@dataclass(frozen=True)
class Snippet:
    kind: str  # "bash", "python" or "app"
    code: str
    where: tuple[str, ...]

    @property
    def id(self) -> str:
        return self.where[0]


@dataclass(frozen=True)
class Target:
    """The cluster the blocks talk to."""

    open_url: str
    keyed_url: str
    api_key: str
    admin_key: str
    redis_url: str
    key_prefix: str

    def rewrite(self, code: str) -> str:
        code = re.sub(r"rediss?://[^\s'\"`)]+", self.redis_url, code)
        code = re.sub(r"\b(?:127\.0\.0\.1|localhost):8000\b", self.open_url.split("//")[1], code)
        return re.sub(r"\bgateway:8000\b", self.keyed_url.split("//")[1], code)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSTREAM_")}
        env.update(
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            KEY=self.api_key, SECRET="docs-test-session-secret", PYTHONUNBUFFERED="1",
            CHATSTREAM_ADMIN_KEY=self.admin_key, CHATSTREAM_REDIS_URL=self.redis_url,
            CHATSTREAM_KEY_PREFIX=self.key_prefix, CHATSTREAM_DEFAULT_MODEL="demo",
        )
        return env


def new_side(diff: str) -> str:
    """The text a diff block leads to: its context and added lines."""
    return "".join(line[1:] for line in diff.splitlines(keepends=True)
                   if line[:1] in (" ", "+") or line == "\n")


def runnable(paths: list[Path]) -> list[Snippet]:
    """The blocks to run, identical ones once."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in paths:
        for fence in read_doc(path).fences:
            kind = KINDS.get(fence.lang)
            if kind is None or fence.skip:
                continue
            code = fence.code
            if kind == "console":
                kind, code = "bash", "".join(line[2:] for line in code.splitlines(keepends=True)
                                             if line.startswith("$ "))
            elif kind == "diff":
                kind, code = "python", new_side(code)
            if kind == "python" and re.search(r"(?m)^app\s*=\s*FastAPI\(", code):
                kind = "app"
            found.setdefault((kind, code), []).append(fence.where)
    return [Snippet(kind, code, tuple(where)) for (kind, code), where in found.items()]


def run(snippet: Snippet, target: Target, folder: Path) -> None:
    """Run one block; raise AssertionError with its output when it fails."""
    code, env = target.rewrite(snippet.code), target.env()
    for tool in DEBIAN_TOOLS:
        if re.search(rf"\b{tool}\b", code) and not shutil.which(tool, path=env["PATH"]):
            reason = f"no {tool}: run scripts/install_test_deps.sh as root (apt-get install {tool})"
            if os.environ.get("CI"):
                pytest.fail(f"{reason}; CI must have it")
            pytest.skip(reason)
    if snippet.kind == "app":
        return serve_app(snippet, code, env, folder)
    if snippet.kind == "bash":
        argv = ["bash", "-e", "-o", "pipefail", "-c", CURL + code]
    else:
        (folder / "block.py").write_text(code)
        argv = [sys.executable, "block.py"]
    try:
        proc = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{snippet.where}: still running after {TIMEOUT_S} s; a block "
                             "that starts a server must be marked skip") from exc
    assert proc.returncode == 0, (
        f"{', '.join(snippet.where)}: exit code {proc.returncode}\n--- block as run:\n{code}"
        f"\n--- stdout:\n{proc.stdout[-3000:]}\n--- stderr:\n{proc.stderr[-3000:]}")


def serve_app(snippet: Snippet, code: str, env: dict[str, str], folder: Path) -> None:
    (folder / "doc_app.py").write_text(code)
    port, log = free_port(), folder / "doc_app.log"
    with open(log, "wb") as out:
        app = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "doc_app:app", "--port", str(port)], cwd=folder,
            env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert app.poll() is None, f"{snippet.where}: the app exited:\n{log.read_text()}"
        try:
            return httpx.get(url + "/openapi.json", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, TIMEOUT_S, what=f"the app of {snippet.where}")
        if '"/chat_stream"' not in code:
            return
        with httpx.stream("POST", url + "/chat_stream", json={"user_input": "Hello"},
                          timeout=30) as resp:
            text = resp.read().decode()
        assert resp.status_code == 200 and text.endswith(EOS), (
            f"{snippet.where}: /chat_stream answered {resp.status_code}: {text[-500:]}\n"
            f"{log.read_text()[-3000:]}")
        if "print(message)" in code:  # the callback's message, once the turn is saved
            wait_until(lambda: "success" in log.read_text().split(), 10,
                       what=f"the callback of {snippet.where} to print success")
    finally:
        app.terminate()
        try:
            app.wait(10)
        except subprocess.TimeoutExpired:
            app.kill()
