"""ChatStream's `client_roles`: parsing, the checks made at start-up, and who gets which role."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from chatstream_cluster.gateway.chatstream.roles import API_NAMES, ClientRoles, is_program


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def role(allow: Any, method: str = "nothing", session: bool = True, **extra: Any) -> dict:
    return {"apis": {"allow": allow, "auth_method": method, "use_session": session, **extra}}


BROWSER = role(["chat_stream", "clear_context", "set_feedback"])
DEFINITION = {
    "user": BROWSER,
    "dev": role("all", "ui_pass_phrase", ui_pass_phrase="open sesame", enable_dev_tool=True),
    "qa": role(["get_prompt"], "ui_pass_phrase_sha256", ui_pass_phrase_sha256=sha("qa pass")),
    "agent": role(["get_load"], session=False),
    "server": role("all", "header_phrase", False, header_phrase="srv"),
    "mon": role(["get_load", "get_resource_usage"], "header_phrase_sha256", False,
                header_phrase=sha("mon")),
}


def test_who_gets_which_role() -> None:
    roles = ClientRoles(DEFINITION)
    # Browsers: the stored role if it is a browser role, else the browser default.
    assert roles.browser_role(None).name == "user"
    assert roles.browser_role("dev").name == "dev"
    assert roles.browser_role("server").name == "user"  # a program role cannot be stored
    assert roles.browser_role("gone").name == "user"  # a role since removed from the config
    # Pass phrases, plain and SHA-256; anything else is chat.
    assert roles.pass_phrase_role("open sesame").name == "dev"
    assert roles.pass_phrase_role("qa pass").name == "qa"
    for other in ("open sesame ", "OPEN SESAME", "", None, sha("qa pass")):
        assert roles.pass_phrase_role(other) is None
    # Programs: the header phrase's role, else the program default.
    assert roles.program_role("srv").name == "server"
    assert roles.program_role("mon").name == "mon"
    assert roles.program_role(sha("mon")).name == "agent"  # the digest is not the phrase
    assert roles.program_role(None).name == "agent"
    assert roles.program_role("wrong").name == "agent"


def test_what_a_role_allows_and_its_chatstream_shape() -> None:
    roles = ClientRoles(DEFINITION)
    user, dev = roles.browser_role(None), roles.browser_role("dev")
    assert user.allows("chat_stream") and not user.allows("get_load")
    assert all(dev.allows(name) for name in API_NAMES)
    assert not dev.allows("delete_everything")  # ChatStream denies unknown API names
    assert dev.as_client_role() == {"client_role_name": "dev", "allowed_apis": "all",
                                    "enable_dev_tool": True}
    assert user.as_client_role()["allowed_apis"] == ["chat_stream", "clear_context",
                                                     "set_feedback"]


def test_without_a_program_default_programs_have_no_role() -> None:
    roles = ClientRoles({"user": BROWSER, "server": DEFINITION["server"]})
    assert roles.program_role(None) is None and roles.program_role("srv").name == "server"


def test_program_or_browser_follows_chatstreams_headers() -> None:
    assert is_program({"x-fastsession-skip": "skip"})
    assert is_program({"x-chatstream-auth-header": "anything"})
    assert not is_program({"x-fastsession-skip": "no"})
    assert not is_program({})


@pytest.mark.parametrize(("definition", "message"), [
    ({}, "non-empty dict"),
    ({"user": {"allow": "all"}}, "expected {'apis'"),
    ({"user": role(None)}, "'allow' property should be set"),
    ({"user": role(["chat_stream", "get_everything"])}, "unknown API names ['get_everything']"),
    ({"user": role("some")}, "'all' or a list"),
    ({"agent": role("all", session=False)}, "no default browser role"),
    ({"a": BROWSER, "b": BROWSER}, "2 default browser roles (a, b)"),
    ({"user": BROWSER, "x": role("all", "password")}, "unknown auth_method 'password'"),
    ({"user": BROWSER, "x": role("all", "ui_pass_phrase", False, ui_pass_phrase="p")},
     "needs use_session: true"),
    ({"user": BROWSER, "x": role("all", "header_phrase", True, header_phrase="p")},
     "needs use_session: false"),
    ({"user": BROWSER, "x": role("all", "ui_pass_phrase")}, "needs a non-empty 'ui_pass_phrase'"),
    ({"user": BROWSER, "x": role("all", "header_phrase_sha256", False, header_phrase="abc")},
     "64 hex digits"),
])
def test_a_bad_definition_is_refused_at_once(definition: dict, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        ClientRoles(definition)
    assert message in str(raised.value)


def test_header_phrase_sha256_also_reads_its_own_key() -> None:
    roles = ClientRoles({"user": BROWSER, "m": role("all", "header_phrase_sha256", False,
                                                    header_phrase_sha256=sha("x").upper())})
    assert roles.program_role("x").name == "m"
