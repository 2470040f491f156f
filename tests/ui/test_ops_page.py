"""The ops page at `/admin`, in headless chromium: the admin key, live workers, queue depth.

The first test runs real gateway and mock worker processes; the second feeds the page a
made-up `/admin/status` (Playwright's routing) to check how it renders what the cluster here
does not produce (KV usage, stale and draining workers, markup in names).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.cluster import Proc, wait_until
from tests.ui.conftest import PHONE
from tests.ui.load import StreamLoad

pytestmark = pytest.mark.slow

ADMIN_KEY = "ops-page-admin-key-42"


def admin_status(gateway: Proc) -> dict[str, Any]:
    return httpx.get(gateway.url + "/admin/status", timeout=5,
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()


def row(worker: Proc) -> str:
    return f"tr[data-worker-id='{worker.settings['worker_id']}']"


def text_is(page: Any, element_id: str, value: str, timeout: float = 15_000) -> None:
    page.wait_for_function("([id, v]) => document.getElementById(id).textContent === v",
                           arg=[element_id, value], timeout=timeout)


def test_ops_page_follows_workers_and_the_queue(context, cluster) -> None:  # noqa: ANN001
    first = cluster.start_worker("mock", mock_tokens_per_s=20, max_batch=1, worker_ttl=1.0)
    gateway = cluster.start_gateway(admin_key=ADMIN_KEY, max_queue=16)
    cluster.wait_ready(gateway)
    page = context.new_page()
    page.goto(gateway.url + "/admin")

    # No key yet: the page asks for it and shows no figure.
    page.wait_for_function("() => document.getElementById('notice').textContent"
                           ".startsWith('Admin key needed')")
    assert page.text_content("#queue-depth") == "–"
    assert page.locator("#admin-key").is_visible()
    page.fill("#admin-key", ADMIN_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector(row(first))
    assert page.locator("#notice").is_hidden() and page.locator("#key-panel").is_hidden()
    assert ADMIN_KEY not in httpx.get(gateway.url + "/admin").text
    cells = page.locator(f"{row(first)} td").all_text_contents()
    assert cells[1:4] == [admin_status(gateway)["workers"][0]["host"], "cpu", "mock"]
    assert cells[4] == "0 / 1" and cells[-1] == "serving"

    # A worker appears, then dies (SIGKILL) and leaves the table after its TTL.
    second = cluster.start_worker("mock", mock_tokens_per_s=20, max_batch=1, worker_ttl=1.0)
    page.wait_for_selector(row(second))
    text_is(page, "running", "0 / 2")
    second.kill()
    page.wait_for_selector(row(second), state="detached", timeout=10_000)
    text_is(page, "running", "0 / 1")

    # Load: one generation runs, three wait.
    load = StreamLoad(gateway.url, 4)
    try:
        text_is(page, "queue-depth", "3")
        text_is(page, "running", "1 / 1")
        assert admin_status(gateway)["queue_depth"] == 3  # the figure the page shows
        assert page.locator(f"{row(first)} td.running").text_content() == "1 / 1"
        # The chart's next refresh (every 5 s) shows the queue that built up.
        page.wait_for_function(
            "() => Number(document.getElementById('chart-queue').dataset.peak) >= 3",
            timeout=20_000)
        assert page.locator("#chart-queue polyline").count() >= 1
    finally:
        load.stop()
    text_is(page, "queue-depth", "0")
    wait_until(lambda: admin_status(gateway)["running"] == 0, 10, what="the load to go")
    page.wait_for_function(
        "() => Number(document.getElementById('tokens-per-s').textContent) > 0")


FAKE_STATUS = {
    "queue_depth": 5, "waiting_for_permit": 4, "undelivered_jobs": 1, "running": 7,
    "capacity": 8,
    "workers": [
        {"id": "gpu-a", "pid": 1, "host": "node-1", "model": "llama", "device": "cuda:0",
         "running": 4, "max_batch": 4, "draining": False, "tokens_per_s": 812.5,
         "last_heartbeat_s": 0.2, "state": "serving", "kv_tokens_used": 1024,
         "kv_tokens_total": 4096},
        {"id": "gpu-b", "pid": 2, "host": "node-1", "model": "llama", "device": "cuda:1",
         "running": 3, "max_batch": 4, "draining": True, "tokens_per_s": 400.0,
         "last_heartbeat_s": 0.4, "state": "draining"},
        {"id": "<img src=x onerror=window.__pwned=1>", "pid": 3, "host": "node-2",
         "model": "llama", "device": "cuda:0", "running": 0, "max_batch": 4, "draining": False,
         "tokens_per_s": 0.0, "last_heartbeat_s": 3.8, "state": "stale"},
    ],
    "models": [
        {"name": "llama", "queue_depth": 5, "waiting_for_permit": 4, "undelivered_jobs": 1,
         "running": 7, "capacity": 8, "workers": 3, "serving": 2, "waiting_in_workers": 0,
         "tokens_per_s": 1212.5, "declared": False},
        {"name": "<b>cold</b>", "queue_depth": 2, "waiting_for_permit": 2,
         "undelivered_jobs": 0, "running": 0, "capacity": 0, "workers": 0, "serving": 0,
         "waiting_in_workers": 0, "tokens_per_s": 0.0, "declared": True},
    ],
    "last_minute": {"scope": "cluster", "seconds": 60.0, "tokens_per_s": 1212.5,
                    "tokens": 72750, "ttft_p50_s": 0.12, "ttft_p99_s": 2.5,
                    "ttft_samples": 310, "rejected": {"queue_full": 2, "queue_timeout": 1}},
}
FAKE_HISTORY = {"scope": "cluster", "bucket_s": 5, "seconds": 600, "points": [
    {"t": i * 5, "tokens_per_s": None if i < 3 else 100.0 + i,
     "queue_depth": None if i in (0, 1, 2, 6) else i, "rejected": 0} for i in range(10)]}


def answer_with(body: dict[str, Any]) -> Any:
    """A Playwright route handler answering `body` as JSON."""

    def handler(route: Any) -> None:
        route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    return handler


def test_ops_page_renders_kv_usage_states_and_text_only(browser, cluster) -> None:  # noqa: ANN001
    gateway = cluster.start_gateway()  # no admin key: loopback clients may read
    ctx = browser.new_context(viewport=PHONE, color_scheme="dark")
    try:
        page = ctx.new_page()
        for path, body in (("**/admin/status", FAKE_STATUS), ("**/admin/history", FAKE_HISTORY)):
            page.route(path, answer_with(body))
        page.goto(gateway.url + "/admin")
        page.wait_for_selector("body[data-state='ok']")
        rows = page.locator("#workers tbody tr")
        assert rows.count() == 3
        kv = page.locator("#workers td.kv-usage").all_text_contents()
        assert kv[0].startswith("25%") and "4,096" in kv[0]
        assert kv[1:] == ["–", "–"]  # not reported: shown as unknown, not as 0
        states = page.locator("#workers td.state")
        assert states.all_text_contents() == ["serving", "draining", "stale"]
        assert "state-stale" in states.nth(2).get_attribute("class")
        assert page.locator("#workers td").first.text_content() == "gpu-a"
        assert rows.nth(2).locator("td").first.text_content() == FAKE_STATUS["workers"][2]["id"]
        assert page.locator("#workers img").count() == 0
        assert page.evaluate("window.__pwned") is None
        models = page.locator("#models tbody tr")
        assert models.count() == 2 and page.locator("#no-models").is_hidden()
        assert models.nth(0).locator("td").all_text_contents() == [
            "llama", "5", "7 / 8", "2 serving / 3 live", "0", "1,212.5"]
        cold = models.nth(1).locator("td").all_text_contents()
        assert cold[:4] == ["<b>cold</b>", "2", "0 / 0", "none (cold)"]  # text, not markup
        assert page.locator("#models b").count() == 0
        assert page.text_content("#queue-depth") == "5"
        assert page.text_content("#running") == "7 / 8"
        assert page.text_content("#ttft") == "120 ms / 2.5 s"
        assert page.text_content("#rejected") == "3"
        assert "queue_full 2" in page.text_content("#rejected-detail")
        page.wait_for_selector("#chart-queue polyline")
        assert page.locator("#chart-queue polyline").count() == 2  # a gap where none sampled
        assert page.get_attribute("#chart-queue", "data-peak") == "9"
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    finally:
        ctx.close()
