"""The chat page at `/`, in headless chromium, against real gateway and mock worker processes.

Three gateways share one mock worker (20 tokens/s per stream, so streaming is visible):
`short` (24-token replies), `full` (600-token replies, one generation at a time and no queue:
the next one is a 429) and `keyed` (with --api-key).
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import redis as redis_sync

from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.schemas import ChatMessage
from chatstream_cluster.worker.mock_engine import mock_reply, render_prompt
from tests.cluster import Proc, wait_until
from tests.ui.conftest import PHONE

pytestmark = pytest.mark.slow

API_KEY = "sk-ui-test-0123456789"
SHORT_TOKENS = 24

# Records every distinct text the newest reply shows, as the page changes it.
RECORD_TEXTS = """() => {
  window.__texts = [];
  const list = document.getElementById('messages');
  new MutationObserver(() => {
    const replies = list.querySelectorAll('li.assistant:not(.welcome) .text');
    const text = replies.length ? replies[replies.length - 1].textContent : null;
    if (text !== null && window.__texts[window.__texts.length - 1] !== text) {
      window.__texts.push(text);
    }
  }).observe(list, {subtree: true, childList: true, characterData: true});
}"""
REPLIES = "li.assistant:not(.welcome)"


@pytest.fixture(scope="module")
def gw(module_cluster) -> SimpleNamespace:  # noqa: ANN001
    c = module_cluster
    c.start_worker("mock", mock_tokens_per_s=20, max_batch=4)
    short = c.start_gateway(default_max_tokens=SHORT_TOKENS)
    full = c.start_gateway(default_max_tokens=600, max_concurrent=1, max_queue=0)
    keyed = c.start_gateway(default_max_tokens=SHORT_TOKENS, api_keys=[API_KEY])
    for gateway in (short, full, keyed):
        c.wait_ready(gateway)
    return SimpleNamespace(short=short, full=full, keyed=keyed, keys=Keys(c.key_prefix),
                           redis_url=c.redis_url)


def first_reply(text: str, tokens: int = SHORT_TOKENS) -> str:
    """What the mock model answers to a first turn `text`."""
    return mock_reply(render_prompt([ChatMessage(role="user", content=text)]), tokens)


def open_chat(context: Any, gateway: Proc) -> Any:
    page = context.new_page()
    page.goto(gateway.url + "/")
    page.wait_for_selector("body[data-ready='true']")
    return page


def send(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_replies(page: Any, count: int, state: str = "done") -> None:
    """Until the page shows `count` replies and the newest has class `state`."""
    page.wait_for_function(
        """([sel, n, state]) => {
          const r = document.querySelectorAll(sel);
          return r.length === n && r[n - 1].classList.contains(state);
        }""",
        arg=[REPLIES, count, state],
    )


def wait_streaming(page: Any, words: int = 3) -> None:
    """Until the newest reply streams and shows more than `words` words."""
    page.wait_for_function(
        "([sel, n]) => { const r = [...document.querySelectorAll(sel)].pop();"
        " return r && r.classList.contains('streaming')"
        " && r.querySelector('.text').textContent.split(' ').length > n; }",
        arg=[REPLIES, words])


def chat_once(context: Any, gateway: Proc, text: str) -> Any:
    """A fresh page that sent `text` and shows the whole reply."""
    page = open_chat(context, gateway)
    send(page, text)
    wait_replies(page, 1)
    return page


def reply_texts(page: Any) -> list[str]:
    return page.locator(f"{REPLIES} .text").all_text_contents()


def status(gateway: Proc) -> dict[str, Any]:
    return httpx.get(gateway.url + "/admin/status", timeout=5).json()  # loopback: no key


def wait_idle(gateway: Proc) -> None:
    """No permit held and no sequence on any worker (a stopped turn is really gone)."""
    def idle() -> bool:
        s = status(gateway)
        return s["running"] == 0 and all(w["running"] == 0 for w in s["workers"])

    wait_until(idle, 10, interval=0.1, what="the cluster to be idle")


def server_prompt(page: Any) -> str | None:
    """The session's last prompt + reply, as /get_prompt returns it (the page's cookie)."""
    prompt = page.request.get(page.url + "get_prompt").json()["prompt"]
    return None if prompt is None else unquote(prompt)


def test_a_reply_streams_visibly_and_completely(context, gw) -> None:  # noqa: ANN001
    page = open_chat(context, gw.short)
    page.evaluate(RECORD_TEXTS)
    send(page, "hello there")
    wait_replies(page, 1)
    final = first_reply("hello there")
    assert reply_texts(page) == [final]
    assert page.locator("li.user .text").all_text_contents() == ["hello there"]
    steps = page.evaluate("window.__texts")
    partial = [t for t in steps if t and t != final]
    assert len(partial) >= 3, steps  # text appeared while it streamed
    assert all(final.startswith(t) for t in partial)
    assert steps[-1] == final
    assert page.locator("#notice").is_hidden()
    assert page.locator(f"{REPLIES} .actions button.regenerate").count() == 1
    assert page.locator("#send").is_visible() and page.locator("#stop").is_hidden()


def test_regenerate_replaces_the_last_reply(context, gw) -> None:  # noqa: ANN001
    page = chat_once(context, gw.short, "tell me more")
    first_id = page.get_attribute(REPLIES, "data-message-id")
    page.evaluate(RECORD_TEXTS)
    page.click("button.regenerate")
    page.wait_for_function(
        "([sel, old]) => { const r = document.querySelector(sel);"
        " return r.dataset.messageId !== old && r.classList.contains('done'); }",
        arg=[REPLIES, first_id],
    )
    final = first_reply("tell me more")  # the mock's text depends on the prompt only
    assert reply_texts(page) == [final]  # replaced in place, not appended
    steps = page.evaluate("window.__texts")
    assert steps[0] in ("", final[: len(steps[0])]) and len(steps) >= 3, steps  # streamed anew
    # The session holds the new reply once: the history was replaced, not extended.
    assert server_prompt(page).count(final.strip()) == 1


def test_stop_cancels_the_generation(context, gw) -> None:  # noqa: ANN001
    wait_idle(gw.full)
    page = open_chat(context, gw.full)
    send(page, "a long story please")
    wait_streaming(page)
    assert page.locator("#stop").is_visible()
    page.click("#stop")
    wait_replies(page, 1, "stopped")
    assert "incomplete" in page.locator(f"{REPLIES} .status").text_content()
    shown = reply_texts(page)[0]
    assert 0 < len(shown) < len(first_reply("a long story please", 600))
    wait_idle(gw.full)  # the worker dropped the sequence and the permit is back
    assert reply_texts(page) == [shown]  # nothing arrived after the stop
    assert page.locator("#send").is_visible()


def test_clear_empties_the_history(context, gw) -> None:  # noqa: ANN001
    page = chat_once(context, gw.short, "remember this")
    assert "remember this" in server_prompt(page)
    page.click("#clear")
    page.wait_for_function("() => document.querySelectorAll('#messages li').length === 0")
    assert server_prompt(page) is None
    send(page, "fresh start")
    wait_replies(page, 1)
    prompt = server_prompt(page)
    assert "fresh start" in prompt and "remember this" not in prompt
    assert reply_texts(page) == [first_reply("fresh start")]  # a first turn again


def test_like_and_dislike_reach_the_feedback_stream(context, gw) -> None:  # noqa: ANN001
    page = chat_once(context, gw.short, "rate me")
    message_id = page.get_attribute(REPLIES, "data-message-id")
    client = redis_sync.Redis.from_url(gw.redis_url)
    try:
        before = client.xlen(gw.keys.feedback)
        page.click("button.like")
        page.wait_for_selector("button.like[aria-pressed='true']")
        page.click("button.dislike")
        page.wait_for_selector("button.dislike[aria-pressed='true']")
        entries = client.xrange(gw.keys.feedback)[before:]
    finally:
        client.close()
    feedback = [json.loads(fields[b"data"]) for _id, fields in entries]
    assert [(f["message_id"], f["is_like"]) for f in feedback] == [
        (message_id, True), (message_id, False)]
    assert feedback[0]["message"] == reply_texts(page)[0] == first_reply("rate me")
    assert page.locator("button.like").get_attribute("aria-pressed") == "false"


def test_markup_in_a_reply_is_shown_as_text(context, gw) -> None:  # noqa: ANN001
    markup = ('<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
              " <b>bold</b> &amp; <i>more</i>")
    page = chat_once(context, gw.short, "echo: " + markup)  # the mock answers it verbatim
    assert reply_texts(page) == [markup]
    assert page.locator("#messages script, #messages img, #messages b, #messages i").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert page.locator("li.user .text").text_content() == "echo: " + markup


def test_a_full_cluster_answers_busy_with_its_retry_delay(browser, gw) -> None:  # noqa: ANN001
    wait_idle(gw.full)
    holder_ctx, other_ctx = browser.new_context(), browser.new_context()
    try:
        holder = open_chat(holder_ctx, gw.full)
        send(holder, "hold the only slot")
        wait_streaming(holder)
        other = open_chat(other_ctx, gw.full)
        send(other, "let me in")
        other.wait_for_selector("#notice:not([hidden])")
        notice = other.locator("#notice").text_content()
        assert notice.startswith("Busy") and "retry in 1 s" in notice, notice
        assert other.locator("#messages li").count() == 0  # the refused turn left no bubble
        assert other.input_value("#input") == "let me in"  # ready to send again
        holder.click("#stop")
        wait_replies(holder, 1, "stopped")
    finally:
        holder_ctx.close()
        other_ctx.close()
    wait_idle(gw.full)


def test_one_turn_at_a_time_per_conversation(context, gw) -> None:  # noqa: ANN001
    wait_idle(gw.full)
    first = open_chat(context, gw.full)
    send(first, "a long answer")
    wait_streaming(first)
    second = open_chat(context, gw.full)  # same browser, same session cookie
    send(second, "and another")
    second.wait_for_selector("#notice:not([hidden])")
    assert second.locator("#notice").text_content().startswith("One turn at a time")
    first.click("#stop")
    wait_replies(first, 1, "stopped")
    wait_idle(gw.full)


def test_api_key_is_asked_for_and_sent(context, gw) -> None:  # noqa: ANN001
    page = open_chat(context, gw.keyed)
    assert page.locator("#api-key").is_visible()  # the gateway wants a key: asked up front
    send(page, "hi")
    page.wait_for_selector("#notice:not([hidden])")
    assert page.locator("#notice").text_content().startswith("API key needed")
    assert page.input_value("#input") == "hi"
    page.fill("#api-key", API_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_function("() => document.getElementById('notice').textContent"
                           ".includes('saved')")
    send(page, "hi")
    wait_replies(page, 1)
    assert reply_texts(page) == [first_reply("hi")]
    page.reload()  # the key stays in this tab's sessionStorage, never in the page itself
    page.wait_for_selector("body[data-ready='true']")
    assert page.input_value("#api-key") == API_KEY
    assert API_KEY not in page.content().replace(page.input_value("#api-key"), "")
    assert API_KEY not in httpx.get(gw.keyed.url + "/").text
    page.fill("#api-key", "wrong-key")
    page.click("#key-form button[type=submit]")
    send(page, "again")
    page.wait_for_function("() => document.getElementById('notice').textContent"
                           ".startsWith('API key refused')")


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_phone_width_and_colour_schemes(browser, gw, scheme: str) -> None:  # noqa: ANN001
    ctx = browser.new_context(viewport=PHONE, color_scheme=scheme, is_mobile=True,
                              has_touch=True)
    try:
        page = open_chat(ctx, gw.short)
        send(page, "a phone-sized question " * 6)
        wait_replies(page, 1)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        box = page.locator("#composer").bounding_box()
        assert box["y"] + box["height"] <= PHONE["height"] + 1 and box["width"] <= PHONE["width"]
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        red, green, blue = (int(v) for v in background[4:-1].split(",")[:3])
        luminance = (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255
        assert (luminance < 0.2) if scheme == "dark" else (luminance > 0.8), background
    finally:
        ctx.close()


def test_a_stream_that_breaks_off_is_marked_cut_off(context, gw, module_cluster) -> None:  # noqa: ANN001
    # Last in the module: its dead gateway's permit lingers for its (short) lease.
    doomed = module_cluster.start_gateway(default_max_tokens=600, permit_lease=2)
    module_cluster.wait_ready(doomed)
    page = open_chat(context, doomed)
    send(page, "this will not finish")
    wait_streaming(page)
    doomed.kill()  # the connection drops mid-reply
    wait_replies(page, 1, "cut")
    assert page.locator(f"{REPLIES} .status").text_content().startswith("Cut off")
    assert not page.locator(REPLIES).evaluate("li => li.classList.contains('done')")
