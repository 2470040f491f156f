"""Take the README's screenshots of the chat page and the ops page (desktop and phone width).

    .venv/bin/python scripts/take_screenshots.py [--out docs/screenshots]

Starts its own Redis, two mock workers and a gateway (the test suite's process helpers), puts
some load on them for about a minute so the ops page has figures and a chart, and drives
Debian's chromium through Playwright like tests/ui/ do. Desktop shots use the light colour
scheme, phone shots the dark one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402

from chatstream_cluster.shared.redis_server import RedisServer  # noqa: E402
from tests.cluster import Cluster  # noqa: E402
from tests.ui.conftest import CHROMIUM, CHROMIUM_ARGS, DESKTOP, PHONE  # noqa: E402
from tests.ui.load import StreamLoad  # noqa: E402

ADMIN_KEY = "screenshot-admin-key"
LOAD_S = 70.0


def _chat(page, url: str, turns: list[str], *, like: bool) -> None:  # noqa: ANN001
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='true']")
    for n, text in enumerate(turns, 1):
        page.fill("#input", text)
        page.press("#input", "Enter")
        page.wait_for_function(
            "(n) => { const r = document.querySelectorAll('li.assistant:not(.welcome)');"
            " return r.length === n && r[n - 1].classList.contains('done'); }", arg=n)
    if like:
        page.locator("button.like").first.click()
        page.wait_for_selector("button.like[aria-pressed='true']")


def _ops(page, url: str) -> None:  # noqa: ANN001
    page.goto(url + "/admin")
    page.fill("#admin-key", ADMIN_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("body[data-state='ok']")
    page.wait_for_function("() => document.querySelector('#chart-tokens polyline')")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis", appendonly=False).start()
        procs = Cluster(redis.url, "shots", Path(tmp))
        load = None
        try:
            for n in range(2):
                procs.start_worker("mock", mock_tokens_per_s=15, max_batch=4,
                                   worker_id=f"gpu-node-{n}")
            gateway = procs.start_gateway(
                admin_key=ADMIN_KEY, default_max_tokens=40, max_queue=32,
                ui_welcome_message="Hello! This cluster runs the mock model: ask anything.",
            )
            procs.wait_ready(gateway, workers=2)
            load = StreamLoad(gateway.url, 11, 60, repeat=True)  # 8 running, a few waiting
            time.sleep(LOAD_S)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                     args=CHROMIUM_ARGS)
                for name, viewport, scheme in (("desktop", DESKTOP, "light"),
                                               ("phone", PHONE, "dark")):
                    ctx = browser.new_context(viewport=viewport, color_scheme=scheme,
                                              device_scale_factor=1)
                    page = ctx.new_page()
                    _chat(page, gateway.url, ["What does the cluster do?", "And the gateway?"],
                          like=True)
                    page.screenshot(path=str(out / f"chat-{name}.png"))
                    _ops(page, gateway.url)
                    page.screenshot(path=str(out / f"ops-{name}.png"), full_page=True)
                    ctx.close()
                browser.close()
        finally:
            if load is not None:
                load.stop()
            procs.stop()
            redis.stop()
    for path in sorted(out.glob("*.png")):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
