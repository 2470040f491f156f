"""A ChatStream user's FastAPI app after the migration of docs/migration.md.

Built like a ChatStream app: the object is created at import time, the app's own
`/chat_stream` route reads the body first ("interception") and passes it on with a callback,
and `append_apis` mounts the other endpoints. No start-up hook: the first request connects.
Settings come from `CHATSTREAM_*` env vars. `/test/events` shows the tests what the app saw.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request

from chatstream_cluster import ChatStreamCluster

events: list[dict[str, Any]] = []


def on_feedback(request: Request, feedback: Any) -> None:
    events.append({"kind": "feedback", "message_id": feedback.message_id,
                   "is_like": feedback.is_like, "message": feedback.message,
                   "form_data": feedback.form_data})


chat_stream = ChatStreamCluster(on_feedback=on_feedback)
app = FastAPI()


def callback(request: Request, message: str) -> None:
    events.append({"kind": "callback", "test_id": request.headers.get("x-test-id"),
                   "message": message})


@app.post("/chat_stream")
async def stream_api(request: Request) -> Any:
    request_body = await request.body()
    data = json.loads(request_body)  # the app inspects the request before ChatStream runs
    events.append({"kind": "request", "test_id": request.headers.get("x-test-id"),
                   "user_input": data.get("user_input")})
    return await chat_stream.handle_chat_stream_request(
        request, request_body=request_body, callback=callback
    )


chat_stream.append_apis(app, {"exclude": ["chat_stream"]})


@app.get("/test/events")
async def test_events() -> list[dict[str, Any]]:
    return events
