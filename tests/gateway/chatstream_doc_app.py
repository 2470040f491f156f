"""A ChatStream app written the way ChatStream's documentation writes one, after the migration
of docs/migration.md: only the import and the model arguments changed.

It has ChatStream's interception route (`await request.body()`, then
`handle_chat_stream_request(request, request_body, callback=...)`), ChatStream's documented
stream-end callback verbatim (`callback_func`), `append_middlewares`, `append_apis`, a
`startup` hook calling `start_queue_worker()`, client roles with every auth method, and a
request handler that keeps each logged-in user's history in files (a stand-in for a database,
shared by every process). `/test/events` shows the tests what the app saw; `/test/admin` is an
app route guarded with `verify_role_for_api`; `/test/feedback` calls
`handle_set_feedback_request(request, {"on_feedback_received": ...})` as ChatStream took it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from chatstream_cluster import ChatStreamCluster as ChatStream
from chatstream_cluster import RequestHandler

HISTORY_DIR = Path(os.environ.get("DOC_APP_HISTORY_DIR", "."))
events: list[dict[str, Any]] = []


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class HistoryPerLoggedInUser(RequestHandler):
    """The app's login puts the user in `X-User`; each user's history lives in a file."""

    async def session_key(self, request: Request) -> str | None:
        return request.headers.get("x-user")

    async def load_history(self, request: Request, key: str) -> list[dict[str, Any]] | None:
        path = HISTORY_DIR / f"{sha256(key)}.json"
        if not path.exists():
            return None
        events.append({"kind": "load_history", "user": key})
        return json.loads(await asyncio.to_thread(path.read_text))

    async def save_history(self, request: Request, key: str, history: list[dict[str, Any]]) -> None:
        path = HISTORY_DIR / f"{sha256(key)}.json"
        await asyncio.to_thread(path.write_text, json.dumps(history))
        events.append({"kind": "save_history", "user": key, "messages": len(history)})


chat_stream = ChatStream(
    num_of_concurrent_executions=2,
    max_queue_size=5,
    max_new_tokens=12,
    client_roles={
        "user": {
            "apis": {
                "allow": ["chat_stream", "clear_context", "get_prompt", "set_feedback"],
                "auth_method": "nothing",  # the default role of browsers
                "use_session": True,
            }
        },
        "developer": {
            "apis": {
                "allow": "all",
                "auth_method": "ui_pass_phrase",
                "ui_pass_phrase": "i am a developer",
                "use_session": True,
                "enable_dev_tool": True,
            }
        },
        "tester": {
            "apis": {
                "allow": ["chat_stream", "get_prompt", "get_generation_params"],
                "auth_method": "ui_pass_phrase_sha256",
                "ui_pass_phrase_sha256": sha256("let me test"),
                "use_session": True,
            }
        },
        "agent": {
            "apis": {
                "allow": ["get_load"],
                "auth_method": "nothing",  # the default role of programs
                "use_session": False,
            }
        },
        "server": {
            "apis": {
                "allow": "all",
                "auth_method": "header_phrase",
                "header_phrase": "server-secret",
                "use_session": False,
            }
        },
        "monitor": {
            "apis": {
                "allow": ["get_load", "get_resource_usage"],
                "auth_method": "header_phrase_sha256",
                "header_phrase": sha256("monitor-secret"),
                "use_session": False,
            }
        },
    },
    request_handler=HistoryPerLoggedInUser(),
)

app = FastAPI()
chat_stream.append_middlewares(app, opts={"cors": {"allow_origins": ["http://localhost:3000"]}})


def callback_func(request, message):  # noqa: ANN001, ANN201 - ChatStream's example, verbatim
    session_mgr = getattr(request.state, "session", None)
    session = session_mgr.get_session()
    chat_prompt = session.get("chat_prompt")
    print(chat_prompt.create_prompt())


def callback(request: Request, message: str) -> None:
    """Runs ChatStream's example and records what it printed (or how it failed)."""
    printed = io.StringIO()
    event: dict[str, Any] = {"kind": "callback", "test_id": request.headers.get("x-test-id"),
                             "message": message}
    try:
        with contextlib.redirect_stdout(printed):
            callback_func(request, message)
        role = request.state.session.get_session().get("chat_stream_client_role")
        event["role"] = role["client_role_name"] if role else None
    except Exception as exc:  # noqa: BLE001 - the test reads it
        event["error"] = f"{type(exc).__name__}: {exc}"
    event["printed"] = printed.getvalue()
    events.append(event)


@app.post("/chat_stream")
async def stream_api(request: Request) -> Any:
    request_body = await request.body()
    data = json.loads(request_body)  # the app looks at the request first ("interception")
    events.append({"kind": "request", "test_id": request.headers.get("x-test-id"),
                   "user_input": data.get("user_input")})
    return await chat_stream.handle_chat_stream_request(request, request_body,
                                                        callback=callback)


@app.on_event("startup")
async def startup() -> None:
    await chat_stream.start_queue_worker()


chat_stream.append_apis(app, {"exclude": ["chat_stream"]})


def on_feedback_received(feedback_data: dict[str, Any]) -> None:
    events.append({"kind": "feedback_received", **feedback_data})


@app.post("/test/feedback")
async def feedback_with_chatstream_opts(request: Request) -> Any:
    return await chat_stream.handle_set_feedback_request(
        request, {"on_feedback_received": on_feedback_received})


@app.get("/test/admin")
async def admin_page(request: Request) -> Any:
    denied = await chat_stream.verify_role_for_api(request, "get_resource_usage")
    return denied or {"admin": True}


@app.get("/test/events")
async def test_events() -> list[dict[str, Any]]:
    return events
