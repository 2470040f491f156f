"""When the `sid` cookie is set again (docs/chatstream-api.md, "Sessions"): on every successful
answer of a session endpoint, so its Max-Age slides; an error answer leaves it as it was."""

from __future__ import annotations

import httpx

from tests.gateway.test_chatstream_api import N_TOKENS, chat

SESSION_ENDPOINTS_OK = [
    ("GET", "/get_generation_params", None),
    ("POST", "/set_generation_params", {"temperature": 0.5}),
    ("GET", "/get_prompt", None),
    ("POST", "/clear_context", {}),
]
ERRORS = [
    ("POST", "/set_generation_params", {"temperature": 7}, 400),
    ("POST", "/set_generation_params", {"no_such_param": 1}, 400),
    ("POST", "/chat_stream", {"user_input": 3}, 400),
    ("POST", "/chat_stream", {"regenerate": True}, 400),  # nothing to regenerate
    ("POST", "/set_feedback", {"is_like": True, "message_id": "nope"}, 404),
]


def test_successes_set_the_cookie_again_and_errors_leave_it(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock")
    gateway = cluster.start_gateway(default_max_tokens=N_TOKENS)
    cluster.wait_ready(gateway)
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        reply = chat(client, gateway.url, "hello")
        assert "sid=" in reply.headers["set-cookie"]
        sid = client.cookies["sid"]
        feedback = client.post("/set_feedback", json={"is_like": True,
                                                      "message_id": reply.message_id})
        assert feedback.status_code == 200 and "sid=" in feedback.headers["set-cookie"]
        for method, path, body in SESSION_ENDPOINTS_OK:
            resp = client.request(method, path, json=body)
            assert resp.status_code == 200, (path, resp.text)
            assert resp.headers.get("set-cookie", "").startswith(f"sid={sid};"), path
            assert "Max-Age=" in resp.headers["set-cookie"], path
        for method, path, body, status in ERRORS:
            resp = client.request(method, path, json=body)
            assert resp.status_code == status, (path, body, resp.text)
            assert "set-cookie" not in resp.headers, (path, body)
        assert client.cookies["sid"] == sid  # the session goes on after the errors
