"""Browser fixtures: Debian's chromium driven by Playwright (no browser download), one browser
per test module, a fresh context (cookies, sessionStorage) per test.

scripts/install_test_deps.sh (run by `make test`) installs chromium. Where it cannot be
installed (not root), these tests skip and say why; with CI set they fail instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster import Cluster

CHROMIUM = os.environ.get("CHATSTREAM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must have it (scripts/install_test_deps.sh runs as root)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless chromium for the module (Playwright's launch: a fresh profile)."""
    try:
        from playwright.sync_api import sync_playwright  # noqa: PLC0415
    except ImportError:
        _unavailable("playwright is not installed: pip install -e '.[test]'")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"no chromium at {CHROMIUM}: run scripts/install_test_deps.sh as root "
                     "(apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    """A fresh browser context (its own cookies and storage) at desktop size."""
    ctx = browser.new_context(viewport=DESKTOP)
    ctx.set_default_timeout(15_000)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def module_cluster(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:  # noqa: ANN001
    """The `cluster` fixture's processes, shared by a module's tests (starting gateways and
    workers per test would cost seconds each)."""
    procs = Cluster(redis_server.url, "t" + uuid.uuid4().hex[:10],
                    tmp_path_factory.mktemp("ui-cluster"))
    yield procs
    procs.stop()
