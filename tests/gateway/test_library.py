"""The library API in a ChatStream user's own app (tests/gateway/library_app.py under uvicorn).

Every callback status comes from the situation it names: a client that leaves while its request
waits in the queue, a client that closes mid-stream, a worker that fails the job.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from chatstream_cluster import RequestHandler
from chatstream_cluster.gateway.chatstream import constructor
from chatstream_cluster.gateway.library import ChatStreamCluster
from chatstream_cluster.shared.schemas import ChatMessage
from chatstream_cluster.worker.mock_engine import mock_reply, render_prompt

EOS = "<::EOS::>"


async def poll(check: Callable[[], Any], within: float = 20) -> Any:
    """Await `check()` until it returns something truthy (TimeoutError after `within` s)."""
    async with asyncio.timeout(within):
        while True:
            if value := await check():
                return value
            await asyncio.sleep(0.05)


async def callback_of(client: httpx.AsyncClient, test_id: str) -> str:
    async def find() -> str | None:
        events = (await client.get("/test/events")).json()
        found = [e["message"] for e in events if e["kind"] == "callback"
                 and e["test_id"] == test_id]
        assert len(found) <= 1, f"callback fired {len(found)} times"
        return found[0] if found else None

    return await poll(find)


async def test_callback_statuses_come_from_the_real_situations(cluster, start_app) -> None:  # noqa: ANN001
    cluster.start_worker("mock", mock_tokens_per_s=20)
    app = start_app(max_concurrent=1, default_max_tokens=60)  # one slot; replies take 3 s
    async with (httpx.AsyncClient(base_url=app.url, timeout=60) as first,
                httpx.AsyncClient(base_url=app.url, timeout=60) as second,
                httpx.AsyncClient(base_url=app.url, timeout=60) as third,
                httpx.AsyncClient(base_url=app.url, timeout=10) as probe):
        # 1. "occupy" takes the only slot and streams slowly.
        async with first.stream("POST", "/chat_stream", json={"user_input": "occupy"},
                                headers={"x-test-id": "occupy"}) as occupy:
            assert occupy.status_code == 200
            pieces = occupy.aiter_text()
            await anext(pieces)

            # 2. "queued" waits in line behind it; its client gives up before any text.
            queued = asyncio.create_task(second.post(
                "/chat_stream", json={"user_input": "queued"}, headers={"x-test-id": "queued"}))

            async def waiting() -> bool:
                return (await probe.get("/get_load")).json()["cluster"]["waiting"] == 1

            await poll(waiting)
            queued.cancel()
            assert await callback_of(probe, "queued") == "client_disconnected_before_streaming"

            async for _ in pieces:  # read "occupy" to its end
                pass
        assert await callback_of(probe, "occupy") == "success"

        # 3. "cut" streams, and its client closes the connection after the first chunk.
        async with third.stream("POST", "/chat_stream", json={"user_input": "cut"},
                                headers={"x-test-id": "cut"}) as cut:
            seen = (await anext(cut.aiter_text())).split(EOS)[0]
        assert await callback_of(probe, "cut") == "client_disconnected_while_streaming"
        # Like ChatStream, a reply cut short stays in the history, as far as it got.
        prompt = unquote((await third.get("/get_prompt")).json()["prompt"])
        rendered = render_prompt([ChatMessage(role="user", content="cut")])
        full = mock_reply(rendered, 60)
        saved = prompt.removeprefix(rendered)
        assert prompt.startswith(rendered) and saved.startswith(seen)
        assert full.startswith(saved) and len(saved) < len(full)
        # The request that left the queue left no trace in its session either.
        assert (await second.get("/get_prompt")).json()["prompt"] is None


async def test_a_worker_error_is_unknown_error_occurred(  # noqa: ANN001
    cluster, start_app, demo_model_dir
) -> None:
    cluster.start_worker("demo", model_cache_dir=str(Path(demo_model_dir).parent), max_batch=4)
    app = start_app(default_max_tokens=8)
    async with (httpx.AsyncClient(base_url=app.url, timeout=60) as client,
                httpx.AsyncClient(base_url=app.url, timeout=10) as probe):
        ok = await client.post("/chat_stream", json={"user_input": "hi"},
                               headers={"x-test-id": "ok"})
        assert ok.status_code == 200 and ok.text.endswith(EOS)
        assert await callback_of(probe, "ok") == "success"
        prompt = unquote((await client.get("/get_prompt")).json()["prompt"])
        assert "<|user|>\nhi\n<|assistant|>\n" in prompt  # rendered by the worker's template

        too_long = "a " * 1500  # 3,000 byte tokens: past the demo model's 2,048-token context
        failed = await client.post("/chat_stream", json={"user_input": too_long},
                                   headers={"x-test-id": "too_long"})
        assert failed.status_code == 400
        assert failed.json()["error"]["code"] == "context_length_exceeded"
        message = await callback_of(probe, "too_long")
        status, _, detail = message.partition(",")
        assert status == "unknown_error_occurred"
        assert detail.startswith("context_length_exceeded: prompt is ")
        # The failed turn left the history as it was.
        assert unquote((await client.get("/get_prompt")).json()["prompt"]) == prompt


async def test_interception_feedback_hook_and_clean_shutdown(cluster, start_app) -> None:  # noqa: ANN001
    cluster.start_worker("mock", mock_tokens_per_s=200)
    app = start_app(default_max_tokens=10)
    async with httpx.AsyncClient(base_url=app.url, timeout=30) as client:
        reply = await client.post("/chat_stream", json={"user_input": "hello"},
                                  headers={"x-test-id": "intercepted"})
        assert reply.status_code == 200
        text = reply.text.split(EOS)[-2]
        assert text == mock_reply(render_prompt([ChatMessage(role="user", content="hello")]), 10)
        assert await callback_of(client, "intercepted") == "success"
        message_id = reply.headers["x-chatstream-last-generated-message-id"]
        resp = await client.post("/set_feedback", json={
            "is_like": False, "message_id": message_id, "form_data": {"why": "too short"}})
        assert resp.json() == {"success": True, "message": "success"}
        resp = await client.post("/set_generation_params", json={"temperature": 0.1})
        assert resp.json()["generation_params"]["temperature"] == 0.1
        events = (await client.get("/test/events")).json()
    assert {"kind": "request", "test_id": "intercepted", "user_input": "hello"} in events
    assert {"kind": "feedback", "message_id": message_id, "is_like": False, "message": text,
            "form_data": {"why": "too short"}} in events
    app.terminate()
    assert app.wait(20) in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown
    log = app.log()
    assert "Application shutdown complete." in log
    assert "Traceback" not in log and "destroyed but it is pending" not in log, log[-3000:]


async def test_in_process_lazy_start_openai_routes_and_close(  # noqa: ANN001
    cluster, redis_url: str, key_prefix: str
) -> None:
    cluster.start_worker("mock")
    chat = ChatStreamCluster(redis_url=redis_url, key_prefix=key_prefix,
                             session_secret="in-process-secret")
    app = FastAPI()
    chat.append_apis(app, {"include": ["get_load", "get_prompt"]}, openai=True)
    paths = {getattr(r, "path", None) for r in app.routes}
    assert {"/get_load", "/get_prompt"} <= paths and "/chat_stream" not in paths
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def one_worker() -> bool:
            return len((await client.get("/get_load")).json()["chatstream_workers"]) == 1

        await poll(one_worker)

        async def models() -> list[str]:
            return [m["id"] for m in (await client.get("/v1/models")).json()["data"]]

        assert await poll(models) == ["mock"]  # the OpenAI routes share the lazy state
        bad = await client.post("/v1/chat/completions", json={"model": "mock", "messages": []})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    state = await chat.gateway_state()
    await chat.close()
    assert state.draining and chat._state is None


def test_append_apis_options_follow_chatstream() -> None:
    select = ChatStreamCluster._selected
    assert select(None)[0] == "chat_stream" and len(select(None)) == 8
    assert select({"all": True}) == select(None)
    assert select({}) == []
    assert select({"include": ["get_load", "chat_stream"]}) == ["chat_stream", "get_load"]
    assert "clear_context" not in select({"exclude": ["clear_context", "webui_index"]})
    with pytest.raises(ValueError, match="only one"):
        select({"all": True, "exclude": []})
    with pytest.raises(ValueError, match="unknown API names"):
        select({"include": ["get_everything"]})


def test_append_apis_mounts_the_web_ui_with_chatstreams_params() -> None:
    chat = ChatStreamCluster(redis_url="redis://127.0.0.1:1/0", session_secret="s")
    app = FastAPI()
    chat.append_apis(app, {"all": True, "web_ui_params": {
        "title": "Support <bot>", "welcomeMessage": "Hi! Ask me.", "clearContextOnReload": False,
        "style_opts": {"button_label_regenerate": "Again", "ai_icon_url": "https://x/i.png"},
    }})
    client = TestClient(app)  # not started: the pages need no Redis
    page = client.get("/").text
    config = json.loads(re.search(r'id="chatstream-config">(.*?)</script>', page).group(1))
    assert (config["title"], config["welcomeMessage"]) == ("Support <bot>", "Hi! Ask me.")
    assert config["clearContextOnReload"] is False and config["labels"] == {"regenerate": "Again"}
    assert "<title>Support &lt;bot&gt;</title>" in page and "i.png" not in page
    assert client.get("/chatstream.js").status_code == 200
    assert client.get("/ui/style.css").status_code == 200

    def serves_ui(opts: dict[str, Any] | None) -> bool:
        other = FastAPI()
        chat.append_apis(other, opts)
        return TestClient(other).get("/").status_code == 200

    assert serves_ui(None) and serves_ui({"include": ["webui_index", "webui_js", "chat_stream"]})
    assert serves_ui({"exclude": ["set_feedback"]})
    assert not serves_ui({"exclude": ["webui_index"]})
    assert not serves_ui({"include": ["chat_stream"]}) and not serves_ui({})


def test_chatstream_constructor_arguments_carry_over() -> None:
    chat = ChatStreamCluster(redis_url="redis://127.0.0.1:1/0", session_secret="s",
                             num_of_concurrent_executions=3, max_queue_size=9,
                             max_new_tokens=100, temperature=0.5, top_k=10,
                             too_many_request_as_http_error=True)
    assert (chat.settings.max_concurrent, chat.settings.max_queue) == (3, 9)
    assert chat.settings.default_max_tokens == 100
    assert chat.default_params == {"temperature": 0.5, "top_k_value": 10, "top_p_value": 1.0}
    with pytest.raises(TypeError, match="runs in the cluster's workers"):
        ChatStreamCluster(model=object(), tokenizer=object())
    for name in ("seed", "token_sampler", "repetition_penalty", "probe_mode_enabled"):
        with pytest.raises(TypeError, match=f"{name}: not supported"):
            ChatStreamCluster(**{name: 1})
    for name in ("name", "logger", "locale", "too_many_request_as_http_error"):
        ChatStreamCluster(session_secret="s", **{name: "x"})  # accepted, ignored
    with pytest.raises(TypeError, match="unknown settings"):
        ChatStreamCluster(max_queu=5)
    with pytest.raises(ValueError, match="temperature"):
        ChatStreamCluster(temperature=3.0)


# ChatStream 0.3.0's constructor signature, every argument (chatstream/chat_stream.py).
CHATSTREAM_ARGUMENTS = [
    "name", "model", "tokenizer", "token_sampler", "num_gpus", "device",
    "num_of_concurrent_executions", "max_queue_size", "too_many_request_as_http_error",
    "use_mock_response", "mock_params", "chat_prompt_clazz", "max_new_tokens", "context_len",
    "temperature", "top_k", "top_p", "repetition_penalty", "repetition_penalty_method",
    "add_special_tokens", "request_handler", "logger", "locale", "client_roles", "seed",
    "probe_mode_enabled",
]


def test_every_chatstream_argument_has_an_answer() -> None:
    """Kept, ignored with a reason, or refused naming the replacement; none unknown, and the
    gateway's own (client_roles, request_handler) are never blamed on the workers."""
    handled = {*constructor.RENAMED, *constructor.PARAMS, *constructor.IGNORED,
               *constructor.REFUSED, "client_roles", "request_handler"}
    assert set(CHATSTREAM_ARGUMENTS) == handled
    for name, reason in constructor.REFUSED.items():
        with pytest.raises(TypeError) as raised:
            ChatStreamCluster(session_secret="s", **{name: object()})
        assert str(raised.value) == f"{name}: {reason}"
    assert "--device cuda:N" in constructor.REFUSED["device"]
    assert "--model mock" in constructor.REFUSED["use_mock_response"]
    roles = {"user": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": True}}}
    chat = ChatStreamCluster(session_secret="s", client_roles=roles,
                             request_handler=RequestHandler())
    assert chat.access is not None and chat.request_handler is not None


def test_request_handler_and_roles_errors_name_the_fix(tmp_path: Path) -> None:
    class ChatStreamStyleHandler:
        async def process_request(self, request, request_body, streaming_finished_callback):  # noqa: ANN001, ANN202
            return None

    with pytest.raises(TypeError, match="run the model themselves.*cluster.RequestHandler"):
        ChatStreamCluster(session_secret="s", request_handler=ChatStreamStyleHandler())
    with pytest.raises(TypeError, match="subclass chatstream_cluster.RequestHandler"):
        ChatStreamCluster(session_secret="s", request_handler=object())

    class SimpleSessionRequestHandler:  # ChatStream's default: the built-in cookie session
        pass

    chat = ChatStreamCluster(session_secret="s", request_handler=SimpleSessionRequestHandler())
    assert chat.request_handler is None
    with pytest.raises(ValueError, match="unknown auth_method None"):
        ChatStreamCluster(session_secret="s", client_roles={"x": {"apis": {"allow": "all"}}})
    path = tmp_path / "roles.json"
    path.write_text('{"user": {"apis": {"allow": ["get_load"], "auth_method": "nothing", '
                    '"use_session": true}}}')
    chat = ChatStreamCluster(session_secret="s", client_roles_file=str(path))
    assert chat.access.roles.browser_default.name == "user"
    with pytest.raises(TypeError, match="not both"):
        ChatStreamCluster(session_secret="s", client_roles_file=str(path), client_roles={})
