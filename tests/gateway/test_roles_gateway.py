"""Client roles on the standalone gateway (`--client-roles-file`), together with `--api-key`.

The API key is checked first (401 without it, whatever role headers come along); the role then
decides which ChatStream APIs the client may call (403). Two gateways share one Redis.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from chatstream_cluster.gateway.security import startup_error
from chatstream_cluster.shared.settings import GatewaySettings

KEY = "sk-roles-test-key"
BEARER = {"Authorization": f"Bearer {KEY}"}
EOS = "<::EOS::>"
ROLES = {
    "visitor": {"apis": {"allow": ["chat_stream"], "auth_method": "nothing",
                         "use_session": True}},
    "operator": {"apis": {"allow": "all", "auth_method": "ui_pass_phrase",
                          "ui_pass_phrase": "operator please", "use_session": True}},
    "monitor": {"apis": {"allow": ["get_load", "get_resource_usage"],
                         "auth_method": "header_phrase", "header_phrase": "monitor-secret",
                         "use_session": False}},
}


def forbidden(response: httpx.Response) -> bool:
    body = response.json()
    return (response.status_code == 403 and body["message"] == "Forbidden"
            and body["detail"] == "Denied on role layer.")


async def test_roles_file_and_api_keys_together_on_two_gateways(  # noqa: ANN001
    cluster, tmp_path: Path
) -> None:
    roles_file = tmp_path / "roles.json"
    roles_file.write_text(json.dumps(ROLES))
    cluster.start_worker("mock")
    settings = {"client_roles_file": str(roles_file), "api_keys": [KEY]}
    one, two = cluster.start_gateway(**settings), cluster.start_gateway(**settings)
    cluster.wait_ready(one)
    async with (httpx.AsyncClient(base_url=one.url, timeout=30) as anonymous,
                httpx.AsyncClient(base_url=one.url, timeout=30, headers=BEARER) as browser):
        # No key: 401 before any role is looked at, header phrase or not.
        assert (await anonymous.post("/chat_stream", json={"user_input": "hi"})).status_code == 401
        monitor = {"X-ChatStream-Auth-Header": "monitor-secret"}
        assert (await anonymous.get("/get_load", headers=monitor)).status_code == 401
        wrong_key = {"Authorization": "Bearer nope", **monitor}
        assert (await anonymous.get("/get_load", headers=wrong_key)).status_code == 401

        # Key + the default browser role: chat yes, the rest no.
        reply = await browser.post("/chat_stream", json={"user_input": "hi"})
        assert reply.status_code == 200 and reply.text.endswith(EOS)
        assert forbidden(await browser.get("/get_load"))
        assert forbidden(await browser.get("/get_prompt"))

        # Key + pass phrase on gateway one; the role holds on gateway two.
        promoted = await browser.post("/chat_stream", json={"user_input": "operator please"})
        assert promoted.text == f"New role: 'operator' has been granted{EOS}"
        async with httpx.AsyncClient(base_url=two.url, timeout=30, headers=BEARER,
                                     cookies=browser.cookies) as same_browser:
            assert (await same_browser.get("/get_load")).status_code == 200
            prompt = (await same_browser.get("/get_prompt")).json()["prompt"]
            assert "operator" not in prompt and "hi" in prompt  # the phrase is not history

            # Key + header phrase: the monitor role, on either gateway.
            usage = await same_browser.get("/get_resource_usage", headers=monitor)
            assert usage.status_code == 200
            assert forbidden(await same_browser.post("/chat_stream", json={"user_input": "x"},
                                                     headers=monitor))


def test_a_bad_roles_file_stops_the_gateway_at_start(tmp_path: Path) -> None:
    path = tmp_path / "roles.json"
    assert "cannot read" in startup_error(GatewaySettings(client_roles_file=str(path)))
    path.write_text("{not json")
    assert "not valid JSON" in startup_error(GatewaySettings(client_roles_file=str(path)))
    path.write_text(json.dumps({"ops": {"apis": {"allow": "all", "auth_method": "nothing",
                                                 "use_session": False}}}))
    error = startup_error(GatewaySettings(client_roles_file=str(path)))
    assert "no default browser role" in error and str(path) in error
    path.write_text(json.dumps(ROLES))
    assert startup_error(GatewaySettings(client_roles_file=str(path))) is None
