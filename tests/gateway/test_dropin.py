"""ChatStream's documented app (tests/gateway/chatstream_doc_app.py) on two app processes over
one real mock worker: the callback example, every client-role path, the request handler, CORS.

The two processes share nothing but Redis (and the handler's history files), so whatever a
request on one sees of another's work went through the cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import redis.asyncio as aioredis

from chatstream_cluster.gateway.chatstream.handlers import keyed_sid
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.schemas import JobSpec
from tests.cluster import Proc, wait_until_async

EOS = "<::EOS::>"
DOC_APP = "tests.gateway.chatstream_doc_app:app"
PROGRAM = {"X-FastSession-Skip": "skip"}  # ChatStream's "no session" header: a program
PHRASE = "i am a developer"


def start_doc_apps(start_app, history_dir: Path) -> tuple[Proc, Proc]:  # noqa: ANN001
    env = {"DOC_APP_HISTORY_DIR": str(history_dir)}
    return tuple(start_app(module=DOC_APP, env=env, probe_headers=PROGRAM) for _ in range(2))


async def callback_event(probe: httpx.AsyncClient, test_id: str) -> dict[str, Any]:
    """The app's one callback event for `test_id` (fails if it fired twice)."""

    async def find() -> dict[str, Any] | None:
        found = [e for e in (await probe.get("/test/events")).json()
                 if e["kind"] == "callback" and e["test_id"] == test_id]
        assert len(found) <= 1, f"callback fired {len(found)} times"
        return found[0] if found else None

    return await wait_until_async(find, 20, f"callback of {test_id}")


async def chat(client: httpx.AsyncClient, text: str, test_id: str = "",
               headers: dict[str, str] | None = None) -> httpx.Response:
    return await client.post("/chat_stream", json={"user_input": text},
                             headers={"x-test-id": test_id, **(headers or {})})


async def prompt_of(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> str:
    body = (await client.get("/get_prompt", headers=headers)).json()
    return unquote(body["prompt"]) if body["prompt"] else ""


def forbidden(response: httpx.Response) -> bool:
    """ChatStream's role-layer 403 (plus the gateway's error object)."""
    body = response.json()
    return (response.status_code == 403 and body["success"] is False
            and body["message"] == "Forbidden" and body["detail"] == "Denied on role layer."
            and body["error"]["code"] == "role_forbidden")


async def job_inputs(redis_url: str, key_prefix: str) -> list[str]:
    """Every message content of every job the cluster was given (job specs live a day)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        contents = []
        async for key in client.scan_iter(match=f"{Keys(key_prefix).prefix}:job:*:meta"):
            if packed := await client.hget(key, "spec"):
                contents += [m.content for m in JobSpec.unpack(packed).messages]
        return contents
    finally:
        await client.aclose()


async def test_documented_app_callback_and_every_role_path_across_two_apps(  # noqa: ANN001
    cluster, start_app, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    cluster.start_worker("mock")
    one, two = start_doc_apps(start_app, tmp_path)
    async with (httpx.AsyncClient(base_url=one.url, timeout=30) as browser,
                httpx.AsyncClient(base_url=one.url, timeout=30, headers=PROGRAM) as probe):
        # The default browser role: chat is allowed, and the documented callback runs
        # verbatim, reading the session as the turn left it (reply included).
        reply = await chat(browser, "hello", "hello")
        assert reply.status_code == 200 and reply.text.endswith(EOS)
        text = reply.text.split(EOS)[-2]
        event = await callback_event(probe, "hello")
        assert event["message"] == "success" and "error" not in event, event
        first_prompt = await prompt_of(browser)
        assert first_prompt.endswith(text) and "user: hello\n" in first_prompt
        assert event["printed"] == first_prompt + "\n" and event["role"] == "user"

        # ChatStream's feedback callback, with its dict.
        message_id = reply.headers["x-chatstream-last-generated-message-id"]
        answer = await browser.post("/test/feedback", json={
            "is_like": True, "message_id": message_id, "form_data": {"stars": 5}})
        assert answer.json() == {"success": True, "message": "success"}
        received = [e for e in (await probe.get("/test/events")).json()
                    if e["kind"] == "feedback_received"]
        assert received == [{"kind": "feedback_received", "is_like": True,
                             "form_data": {"stars": 5}, "prompt": first_prompt,
                             "target_message_id": message_id, "target_message": text,
                             "generation_params": received[0]["generation_params"]}]
        assert received[0]["generation_params"]["temperature"] == 1.0

        # Denied: APIs outside the role, answered with ChatStream's 403.
        assert forbidden(await browser.get("/get_load"))
        assert forbidden(await browser.get("/get_generation_params"))
        assert forbidden(await browser.post("/set_generation_params", json={"temperature": 0.1}))
        assert forbidden(await browser.get("/test/admin"))  # verify_role_for_api in the app

        # Promoted by a UI pass phrase on app one...
        promoted = await chat(browser, PHRASE, "phrase")
        assert promoted.status_code == 200
        assert promoted.text == f"New role: 'developer' has been granted{EOS}"
        assert promoted.headers["x-chatstream-api-devtool-enabled"] == "enabled"
        event = await callback_event(probe, "phrase")
        assert (event["message"], event["role"]) == ("success", "developer")

        # ...holds on app two, which never saw it: the role is in the Redis session.
        async with httpx.AsyncClient(base_url=two.url, timeout=30,
                                     cookies=browser.cookies) as same_browser:
            assert (await same_browser.get("/get_load")).status_code == 200
            assert (await same_browser.get("/test/admin")).json() == {"admin": True}
            # The pass-phrase turn reached no model and no history.
            assert await prompt_of(same_browser) == first_prompt
            assert PHRASE not in await job_inputs(redis_url, key_prefix)
            assert (await same_browser.post("/clear_context")).json()["success"] is True
            assert (await same_browser.get("/get_load")).status_code == 200  # the role stays

        # A SHA-256 pass phrase, typed on app two, used on app one.
        async with httpx.AsyncClient(base_url=two.url, timeout=30) as tester:
            promoted = await chat(tester, "let me test")
            assert promoted.text == f"New role: 'tester' has been granted{EOS}"
            assert "x-chatstream-api-devtool-enabled" not in promoted.headers
            async with httpx.AsyncClient(base_url=one.url, timeout=30,
                                         cookies=tester.cookies) as same_tester:
                assert (await same_tester.get("/get_generation_params")).status_code == 200
                assert forbidden(await same_tester.get("/get_load"))

        # Programs: the default program role...
        assert (await probe.get("/get_load")).status_code == 200
        assert forbidden(await probe.get("/get_prompt"))
        assert forbidden(await chat(probe, "hi", "program"))
        event = await callback_event(probe, "program")
        assert event["message"].startswith("unknown_error_occurred,role_forbidden: ")

        # ...promoted by a header phrase, plain and SHA-256, on either app.
        server = {"X-ChatStream-Auth-Header": "server-secret"}
        assert (await chat(browser, "from a server", headers=server)).status_code == 200
        async with httpx.AsyncClient(base_url=two.url, timeout=30) as other:
            assert (await other.get("/get_resource_usage", headers=server)).status_code == 200
            monitor = {"X-ChatStream-Auth-Header": "monitor-secret"}
            assert (await other.get("/get_resource_usage", headers=monitor)).status_code == 200
            assert forbidden(await chat(other, "hi", headers=monitor))
            wrong = {"X-ChatStream-Auth-Header": "not-a-phrase"}  # -> the default program role
            assert (await other.get("/get_load", headers=wrong)).status_code == 200
            assert forbidden(await other.get("/get_resource_usage", headers=wrong))
            # A program's input is never a pass phrase: it goes to the model.
            reply = await chat(other, PHRASE, headers=server)
            assert reply.status_code == 200 and "New role" not in reply.text
    assert PHRASE in await job_inputs(redis_url, key_prefix)


async def test_request_handler_keeps_each_users_history_and_cors(  # noqa: ANN001
    cluster, start_app, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    cluster.start_worker("mock")
    one, two = start_doc_apps(start_app, tmp_path)
    alice = {"X-User": "alice"}
    async with (httpx.AsyncClient(base_url=one.url, timeout=30, headers=alice) as laptop,
                httpx.AsyncClient(base_url=two.url, timeout=30, headers=alice) as phone,
                httpx.AsyncClient(base_url=one.url, timeout=30, headers=PROGRAM) as probe):
        reply = await chat(laptop, "hi from the laptop", "laptop")
        assert reply.status_code == 200 and "sid" not in reply.cookies  # the login names it
        first = reply.text.split(EOS)[-2]
        assert (await callback_event(probe, "laptop"))["message"] == "success"
        # The user's conversation, not the browser's: another device on another app sees it.
        prompt = await prompt_of(phone)
        assert "user: hi from the laptop\n" in prompt and prompt.endswith(first)

        # Redis lost the session (expired, flushed): the handler's copy comes back.
        client = aioredis.Redis.from_url(redis_url)
        await client.delete(Keys(key_prefix).session(keyed_sid("alice")))
        await client.aclose()
        assert await prompt_of(phone) == ""
        reply = await chat(phone, "and from the phone", "phone")
        assert reply.status_code == 200
        assert (await callback_event(phone, "phone"))["message"] == "success"  # app two's
        prompt = await prompt_of(phone)
        assert f"user: hi from the laptop\nassistant: {first}\nuser: and from the phone\n" in prompt

        # /clear_context empties the handler's copy too (else the next turn, finding no
        # history in Redis, would load the old one back).
        assert (await laptop.post("/clear_context")).json()["success"] is True
        await chat(laptop, "fresh start", "fresh")
        assert (await callback_event(probe, "fresh"))["message"] == "success"
        assert (await prompt_of(laptop)).startswith("user: fresh start\n")
        # What each app's handler was asked (message counts of save_history).
        for client, expected in ((probe, [2, 0, "load", 2]), (phone, ["load", 4])):
            events = (await client.get("/test/events")).json()
            asked = [e["messages"] if e["kind"] == "save_history" else "load"
                     for e in events if e["kind"] in ("save_history", "load_history")]
            assert asked == expected, asked  # one: turn, clear, load [], turn; two: load, turn

        # Without a login, the browser's cookie session as before.
        async with httpx.AsyncClient(base_url=one.url, timeout=30) as anonymous:
            reply = await chat(anonymous, "who am i")
            assert "sid" in reply.cookies and "fresh start" not in await prompt_of(anonymous)

        # append_middlewares(app, opts={"cors": ...}) as in ChatStream.
        origin = {"Origin": "http://localhost:3000"}
        preflight = await laptop.options("/chat_stream", headers={
            **origin, "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert preflight.headers["access-control-allow-credentials"] == "true"
        reply = await chat(laptop, "hello", headers=origin)
        exposed = reply.headers["access-control-expose-headers"].lower()
        assert "x-chatstream-last-generated-message-id" in exposed
