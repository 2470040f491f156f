"""The browser pages: the chat page at `/` (with `/chatstream.js`, ChatStream's paths), its
assets under `/ui/`, and the ops page's shell at `/admin`.

The files live in `gateway/static/` (package data; no build step, nothing from a CDN). The
pages hold no secret and no figure, so they load without a key (gateway/auth.py lists them as
open): the chat page sends the API key the user types as `Authorization: Bearer`, and the ops
page reads every figure from `/admin/status` and `/admin/history`, which want the admin key.
Every page response carries a Content-Security-Policy that allows only this origin's scripts
and styles; the pages put model output and figures into the DOM as text only.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

from fastapi import APIRouter, HTTPException
from starlette.responses import Response

log = logging.getLogger("chatstream.gateway")

CHAT_PATH, CHAT_JS_PATH, ASSETS_PREFIX, OPS_PATH = "/", "/chatstream.js", "/ui/", "/admin"
_STATIC = resources.files("chatstream_cluster.gateway") / "static"
#: The assets served under /ui/, by name: no other file of the package can be reached.
ASSETS = {"style.css": "text/css; charset=utf-8", "ops.js": "text/javascript; charset=utf-8"}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# ChatStream's web_ui_params (its `style_opts` flattened) -> ours.
_CHATSTREAM_KEYS = {
    "title": "title", "welcomeMessage": "welcome_message", "initialMessage": "welcome_message",
    "welcome_message": "welcome_message", "clearContextOnReload": "clear_context_on_reload",
    "regenerate_enabled": "regenerate_enabled",
}
_LABEL_KEYS = {"button_label_stop_generating": "stop", "button_label_regenerate": "regenerate",
               "label_input_placeholder": "placeholder", "button_label_send": "send"}


@dataclass(frozen=True)
class ChatPageOptions:
    """What the chat page shows: its title, a first message (shown, never sent to the
    model), whether loading the page starts a fresh conversation (ChatStream's
    `clearContextOnReload`), the regenerate button, button labels, and whether to ask for an
    API key up front (it also asks on any 401)."""

    title: str = "ChatStream Cluster"
    welcome_message: str = ""
    clear_context_on_reload: bool = True
    regenerate_enabled: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    api_key_required: bool = False

    @classmethod
    def from_web_ui_params(cls, params: dict[str, Any] | None, **given: Any) -> ChatPageOptions:
        """From ChatStream's `web_ui_params` (`title`, `welcomeMessage`,
        `clearContextOnReload`, and in `style_opts`: `regenerate_enabled`,
        `button_label_stop_generating`, `button_label_regenerate`, `label_input_placeholder`);
        other keys (icons, styles) are ignored."""
        flat = dict(params or {})
        flat.update(flat.pop("style_opts", None) or {})
        values: dict[str, Any] = dict(given)
        labels: dict[str, str] = {}
        ignored = []
        for key, value in flat.items():
            if key in _CHATSTREAM_KEYS:
                values[_CHATSTREAM_KEYS[key]] = value
            elif key in _LABEL_KEYS:
                labels[_LABEL_KEYS[key]] = str(value)
            else:
                ignored.append(key)
        if ignored:
            log.info("chat page: web_ui_params ignored", extra={"keys": sorted(ignored)})
        return cls(**values, labels=labels)

    def page_config(self) -> dict[str, Any]:
        """The page's settings, as chatstream.js reads them."""
        d = asdict(self)
        return {"title": d["title"], "welcomeMessage": d["welcome_message"],
                "clearContextOnReload": bool(d["clear_context_on_reload"]),
                "regenerateEnabled": bool(d["regenerate_enabled"]), "labels": d["labels"],
                "apiKeyRequired": d["api_key_required"]}


def _read(name: str) -> bytes:
    return (_STATIC / name).read_bytes()


def _script_json(value: Any) -> str:
    """JSON that is safe inside a <script type="application/json"> element."""
    text = json.dumps(value, ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def render_index(options: ChatPageOptions) -> bytes:
    """index.html with the title (escaped) and the page config (as inert JSON) filled in."""
    page = _read("index.html").decode()
    page = page.replace("{{title}}", html.escape(options.title))
    return page.replace("{{config}}", _script_json(options.page_config())).encode()


def _page(body: bytes, media_type: str) -> Response:
    return Response(body, media_type=media_type, headers=PAGE_HEADERS)


def chat_page_router(options: ChatPageOptions) -> APIRouter:
    """`GET /`, `GET /chatstream.js` and the shared assets, for a gateway or a user's app."""
    router = APIRouter(include_in_schema=False)
    index = render_index(options)
    script = _read("chatstream.js")

    @router.get(CHAT_PATH)
    async def webui_index() -> Response:
        return _page(index, "text/html; charset=utf-8")

    @router.get(CHAT_JS_PATH)
    async def webui_js() -> Response:
        return _page(script, "text/javascript; charset=utf-8")

    router.include_router(assets_router())
    return router


def assets_router() -> APIRouter:
    """`GET /ui/<asset>` for the files in ASSETS."""
    router = APIRouter(include_in_schema=False)
    files = {name: _read(name) for name in ASSETS}

    @router.get(ASSETS_PREFIX + "{name}")
    async def asset(name: str) -> Response:
        if name not in files:
            raise HTTPException(404, "no such asset")
        return _page(files[name], ASSETS[name])

    return router


def ops_page_router() -> APIRouter:
    """`GET /admin`: the ops page's shell; its figures come from the admin endpoints."""
    router = APIRouter(include_in_schema=False)
    page = _read("admin.html")

    @router.get(OPS_PATH)
    async def ops_page() -> Response:
        return _page(page, "text/html; charset=utf-8")

    return router


#: ChatStream's API names of its web UI (`web_ui_js` is how its role checks spell the second).
CHATSTREAM_UI_NAMES = frozenset({"webui_index", "webui_js", "web_ui_js"})


def chatstream_ui_selected(opts: dict[str, Any] | None) -> bool:
    """Whether ChatStream's `append_apis` opts select its web UI (None: everything)."""
    if opts is None or opts.get("all"):
        return True
    if "include" in opts:
        return bool(CHATSTREAM_UI_NAMES & set(opts["include"] or []))
    if "exclude" in opts:  # the page is the UI: excluding it leaves the UI out
        return "webui_index" not in set(opts["exclude"] or [])
    return False
