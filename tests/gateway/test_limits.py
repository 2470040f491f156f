"""Every request limit answers a clear 4xx, through a real gateway with a mock worker.

Body size (413), content type (415), UTF-8 and JSON (400), number and length of messages,
the max_tokens ceiling, number and length of stop strings. Known fields are strictly typed (a
wrong JSON type is a 400 naming the field as the client wrote it); parameters the cluster does
not implement are a 400 `unsupported_parameter`; other unknown fields are ignored (as OpenAI's
clients send fields a server may not know). The exception is /set_generation_params, whose body
is the set of params: an unknown name there is a 400.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.cluster import mock_gateway

CHAT = "/v1/chat/completions"
LIMITS = {"max_body_bytes": 4096, "max_messages": 3, "max_message_chars": 50, "max_stop": 2,
          "max_stop_chars": 5, "max_tokens_limit": 20, "default_max_tokens": 4}
# Endpoints that read a JSON body: the body limits apply to each.
BODY_ENDPOINTS = [CHAT, "/chat_stream", "/set_generation_params", "/set_feedback"]


@pytest.fixture(scope="module")
def gateway(redis_server, tmp_path_factory) -> Iterator[str]:  # noqa: ANN001
    """One gateway with small limits and a mock worker, shared by this module's tests."""
    with mock_gateway(redis_server.url, tmp_path_factory.mktemp("limits"), **LIMITS) as gw:
        yield gw.url


def body(**overrides: Any) -> dict[str, Any]:
    return {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            **overrides}


def post(url: str, path: str = CHAT, **kwargs: Any) -> httpx.Response:
    return httpx.post(url + path, timeout=10, **kwargs)


def assert_error(resp: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error


# --- body ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", BODY_ENDPOINTS)
def test_body_too_large_is_413_declared_or_streamed(gateway, path) -> None:  # noqa: ANN001
    big = b'{"pad": "' + b"x" * 5000 + b'"}'
    assert_error(post(gateway, path, content=big, headers={"content-type": "application/json"}),
                 413, "body_too_large")

    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to trust
        yield big[:3000]
        yield big[3000:]

    assert_error(post(gateway, path, content=chunks(),
                      headers={"content-type": "application/json"}), 413, "body_too_large")


@pytest.mark.parametrize("path", BODY_ENDPOINTS)
def test_content_type_utf8_and_json_errors(gateway, path) -> None:  # noqa: ANN001
    assert_error(post(gateway, path, content=b'{"a": 1}', headers={"content-type": "text/plain"}),
                 415, "unsupported_media_type")
    assert_error(post(gateway, path, content=b"a=1",
                      headers={"content-type": "application/x-www-form-urlencoded"}),
                 415, "unsupported_media_type")
    json_type = {"content-type": "application/json"}
    assert_error(post(gateway, path, content=b'{"user_input": "\xff\xfe"}', headers=json_type),
                 400, "invalid_utf8")
    assert_error(post(gateway, path, content=b'{"model": ', headers=json_type),
                 400, "invalid_json")
    assert_error(post(gateway, path, content=b"", headers=json_type), 400, "invalid_json")
    assert post(gateway, path, content=b"[1, 2]", headers=json_type).status_code == 400


def test_json_with_charset_and_plus_json_types_are_accepted(gateway) -> None:  # noqa: ANN001
    for ctype in ("application/json; charset=utf-8", "application/vnd.api+json"):
        resp = post(gateway, content=httpx.Request("POST", "/", json=body()).content,
                    headers={"content-type": ctype})
        assert resp.status_code == 200, (ctype, resp.text)


# --- messages, max_tokens, stop -----------------------------------------------------------------
def test_number_and_length_of_messages(gateway) -> None:  # noqa: ANN001
    four = [{"role": "user", "content": "x"}] * 4
    assert_error(post(gateway, json=body(messages=four)), 400, "too_many_messages", "messages")
    assert_error(post(gateway, json=body(messages=[])), 400, "invalid_value", "messages")
    long = [{"role": "user", "content": "y" * 51}]
    assert_error(post(gateway, json=body(messages=long)), 400, "message_too_long",
                 "messages[0].content")
    parts = [{"role": "system", "content": "s"},
             {"role": "user", "content": [{"type": "text", "text": "z" * 30}] * 2}]
    assert_error(post(gateway, json=body(messages=parts)), 400, "message_too_long",
                 "messages[1].content")
    at_limit = [{"role": "user", "content": "y" * 50}] * 3
    assert post(gateway, json=body(messages=at_limit)).status_code == 200
    assert_error(post(gateway, "/chat_stream", json={"user_input": "u" * 51}), 400,
                 "message_too_long", "user_input")


def test_max_tokens_ceiling(gateway) -> None:  # noqa: ANN001
    assert_error(post(gateway, json=body(max_tokens=21)), 400, "max_tokens_too_large",
                 "max_tokens")
    assert_error(post(gateway, json=body(max_tokens=None, max_completion_tokens=10**12)), 400,
                 "max_tokens_too_large", "max_completion_tokens")
    assert_error(post(gateway, json=body(max_tokens=0)), 400, "invalid_value", "max_tokens")
    ok = post(gateway, json=body(max_tokens=20))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 20
    default = post(gateway, json=body(max_tokens=None))
    assert default.json()["usage"]["completion_tokens"] == 4  # --default-max-tokens


def test_number_and_length_of_stop_strings(gateway) -> None:  # noqa: ANN001
    assert_error(post(gateway, json=body(stop=["a", "b", "c"])), 400, "too_many_stop", "stop")
    assert_error(post(gateway, json=body(stop="abcdef")), 400, "stop_too_long", "stop")
    assert_error(post(gateway, json=body(stop=[""])), 400, "invalid_value", "stop")
    assert post(gateway, json=body(stop=["abcde", "q"])).status_code == 200


def test_wrong_types_name_the_field(gateway) -> None:  # noqa: ANN001
    cases = {"temperature": "hot", "stream": "yes please", "n": 2, "top_p": 0,
             "messages": "hello", "model": ""}
    for field, value in cases.items():
        resp = post(gateway, json=body(**{field: value}))
        assert resp.status_code == 400, (field, resp.text)
        assert resp.json()["error"]["param"].split(".")[0] == field


@pytest.mark.parametrize(("changes", "param", "expected", "got"), [
    ({"max_tokens": "5"}, "max_tokens", "an integer", "a string"),
    ({"max_tokens": True}, "max_tokens", "an integer", "a boolean"),
    ({"max_tokens": 5.0}, "max_tokens", "an integer", "a number"),
    ({"stream": "yes"}, "stream", "a boolean", "a string"),
    ({"temperature": False}, "temperature", "a number", "a boolean"),
    ({"seed": "1"}, "seed", "an integer", "a string"),
    ({"stop": 5}, "stop", "a string or an array", "an integer"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage", "a boolean",
     "an integer"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "a string or an array", "an integer"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content[0].text", "a string", "an integer"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": 1, "content": "x"}]},
     "messages[1].role", None, None),
])
def test_wrong_json_types_are_400_never_coerced(gateway, changes, param, expected, got) -> None:  # noqa: ANN001, E501
    """As in OpenAI's API: "5" and true are not 5; param is the field as the client wrote it."""
    resp = post(gateway, json=body(**changes))
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["param"] == param, resp.text
    if expected:
        assert error["code"] == "invalid_type"
        assert error["message"] == (f"Invalid type for '{param}': expected {expected}, but got "
                                    f"{got} instead.")


@pytest.mark.parametrize(("name", "value"), [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"), ("tool_choice", "auto"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("logprobs", True), ("top_logprobs", 2), ("n", 2), ("logit_bias", {"1": 2}),
    ("presence_penalty", 0.5), ("frequency_penalty", -1),
    ("response_format", {"type": "json_object"}), ("modalities", ["text", "audio"]),
    ("audio", {"voice": "alloy"}), ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}),
])
def test_unimplemented_parameters_are_refused_not_ignored(gateway, name, value) -> None:  # noqa: ANN001
    resp = post(gateway, json=body(**{name: value}))
    assert_error(resp, 400, "unsupported_parameter", name)
    assert "not" in resp.json()["error"]["message"]


def test_unimplemented_parameters_saying_off_are_accepted(gateway) -> None:  # noqa: ANN001
    off = {"tools": [], "tool_choice": "none", "functions": None, "function_call": "none",
           "logprobs": False, "top_logprobs": None, "n": 1, "logit_bias": {},
           "presence_penalty": 0, "frequency_penalty": 0.0, "response_format": {"type": "text"},
           "modalities": ["text"], "audio": None, "stream": None}
    resp = post(gateway, json=body(**off))
    assert resp.status_code == 200, resp.text


# --- unknown fields: ignored, consistently ------------------------------------------------------
def test_unknown_fields_are_ignored_except_unknown_generation_params(gateway) -> None:  # noqa: ANN001
    extra = body(frobnicate={"deep": [1, 2]}, user="u1", metadata={"a": "b"}, store=False,
                 service_tier="auto", response_format=None,
                 stream_options={"include_usage": True, "future": 1},
                 messages=[{"role": "user", "content": "hi", "name": "bob", "refusal": None}])
    resp = post(gateway, json=extra)
    assert resp.status_code == 200, resp.text
    resp = post(gateway, "/chat_stream", json={"user_input": "hi", "unknown": True})
    assert resp.status_code == 200, resp.text
    assert resp.text.endswith("<::EOS::>")
    resp = post(gateway, "/set_feedback", json={"is_like": True, "message_id": "m", "x": 1})
    assert resp.json()["error"]["code"] == "message_not_found"  # past validation
    # The one exception: this body *is* the set of params, so a misspelt name is an error
    # rather than a setting that silently does nothing (docs/chatstream-api.md).
    assert_error(post(gateway, "/set_generation_params", json={"temperature": 0.5, "top_k": 1}),
                 400, "unknown_param", "top_k")
