"""Fuzz the gateway's HTTP API: no input produces a 5xx or a hang.

schemathesis reads the running gateway's own OpenAPI document and generates requests for every
operation in it, valid ones (positive) and ones that break the schema (negative), about 50 per
operation and mode, each with a 10 s timeout. The gateway is a real process with a real Redis and
a mock worker, keyed with an API key that the requests carry (the 401 paths have their own tests
in test_auth.py). No operation is skipped. The ChatStream endpoints read their body themselves and
declare no body schema, so their bodies are fuzzed here too, with hypothesis-generated JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from chatstream_cluster.gateway.app import create_app
from chatstream_cluster.shared.settings import GatewaySettings
from tests.cluster import mock_gateway

API_KEY = "fuzz-api-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT_S = 10  # per request: a hang fails the test instead of stalling it
EXAMPLES = 50
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the repository; runs are bounded and repeatable
    suppress_health_check=list(HealthCheck),
    # No shrinking: each step is an HTTP call; the failing request is reported as found.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
# Small generations keep the valid requests fast; the limits are tested in test_limits.py.
GATEWAY = {"api_keys": [API_KEY], "max_tokens_limit": 32, "default_max_tokens": 8}

# Every operation of the app's OpenAPI document, known without starting anything.
OPERATIONS = [
    f"{method.upper()} {path}"
    for path, methods in create_app(GatewaySettings()).openapi()["paths"].items()
    for method in methods
]


@pytest.fixture(scope="module")
def gateway(redis_server, tmp_path_factory) -> Iterator[str]:  # noqa: ANN001
    with mock_gateway(redis_server.url, tmp_path_factory.mktemp("fuzz"), {"max_batch": 8},
                      **GATEWAY) as gw:
        yield gw.url


@pytest.fixture(scope="module")
def schema(gateway):  # noqa: ANN001, ANN201
    return schemathesis.openapi.from_url(gateway + "/openapi.json", wait_for_schema=10)


def test_the_served_document_has_every_operation(schema) -> None:  # noqa: ANN001
    served = sorted(op.ok().label for op in schema.get_all_operations())
    assert served == sorted(OPERATIONS)
    chat = schema["/v1/chat/completions"]["POST"]
    assert chat.body, "the chat route must declare its request body for the fuzzer"


def _fail_on_5xx(response: Any, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:500]}"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("label", OPERATIONS)
def test_operation_never_answers_5xx(schema, label, mode) -> None:  # noqa: ANN001
    method, path = label.split(" ", 1)
    operation = schema[path][method]
    if mode is GenerationMode.NEGATIVE and not (operation.body or operation.query
                                                or operation.headers):
        pytest.skip("nothing to break: the operation takes no input")

    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(generation_mode=mode), known_model=st.booleans())
    def run(case, known_model: bool) -> None:  # noqa: ANN001
        if known_model and isinstance(case.body, dict):
            case.body["model"] = "mock"  # reach the worker, not only model_not_found
        response = case.call(headers=AUTH, timeout=TIMEOUT_S)
        _fail_on_5xx(response, f"{label} {case.body!r}"[:800])

    run()


# --- the ChatStream endpoints' bodies -----------------------------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=10,
)
_chatstream_fields = st.fixed_dictionaries({}, optional={
    "user_input": st.text(max_size=60) | _json,
    "regenerate": st.booleans() | _json,
    "temperature": st.floats(-1, 2) | _json,
    "top_k_value": st.integers(-5, 600) | _json,
    "top_p_value": st.floats(-1, 2) | _json,
    "is_like": st.booleans() | _json,
    "message_id": st.text(max_size=40) | _json,
    "form_data": _json,
})
_bodies = (_chatstream_fields.map(lambda d: json.dumps(d).encode())
           | _json.map(lambda v: json.dumps(v).encode())
           | st.binary(max_size=80))


@pytest.mark.parametrize("path", ["/chat_stream", "/set_generation_params", "/set_feedback",
                                  "/clear_context"])
def test_chatstream_bodies_never_answer_5xx(gateway, path) -> None:  # noqa: ANN001
    with httpx.Client(base_url=gateway, timeout=TIMEOUT_S, headers=AUTH) as client:

        @FUZZ_SETTINGS
        @given(body=_bodies, ctype=st.sampled_from(["application/json", "text/plain", ""]))
        def run(body: bytes, ctype: str) -> None:
            client.cookies.clear()  # a fresh session each time: no busy-session 409s
            response = client.post(path, content=body, headers={"content-type": ctype})
            _fail_on_5xx(response, f"{path} {body!r}"[:800])

        run()


# --- wrong JSON types, field by field -----------------------------------------------------------
# schemathesis's negative mode breaks the schema somewhere in each request; these send, for every
# field of the served document (nested ones included), every JSON type the field does not take,
# one at a time, and want a 400 that names that field as the client wrote it.
SAMPLES: dict[str, Any] = {"string": "x", "integer": 7, "number": 1.5, "boolean": True,
                           "array": [], "object": {}, "null": None}
VALID_CHAT = {"model": "mock", "max_tokens": 3, "stream_options": {"include_usage": True},
              "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}


def _accepts(schema: dict, defs: dict) -> set[str]:
    """The JSON types a property's schema accepts."""
    if "$ref" in schema:
        return {"object"}
    if "anyOf" in schema:
        return set().union(*(_accepts(member, defs) for member in schema["anyOf"]))
    if "const" in schema or "enum" in schema:
        values = schema.get("enum", [schema.get("const")])
        return {next(t for t, v in SAMPLES.items() if type(v) is type(x)) for x in values}
    kinds = schema.get("type", [])
    kinds = {kinds} if isinstance(kinds, str) else set(kinds)
    return kinds | ({"integer"} if "number" in kinds else set())


def _ref(schema: dict, defs: dict) -> dict | None:
    return defs[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else None


def _fields(schema: dict, defs: dict, path: str = "") -> list[tuple[str, set[str]]]:
    """(path as a client writes it, accepted JSON types) of every field, nested ones too."""
    out = []
    for name, prop in schema.get("properties", {}).items():
        where = f"{path}.{name}" if path else name
        out.append((where, _accepts(prop, defs)))
        for member in prop.get("anyOf", [prop]):
            if (inner := _ref(member, defs)) is not None:
                out += _fields(inner, defs, where)
            if member.get("type") == "array" and (item := _ref(member.get("items", {}),
                                                                 defs)) is not None:
                out.append((f"{where}[0]", {"object"}))
                out += _fields(item, defs, f"{where}[0]")
    return out


def _set(body: Any, path: str, value: Any) -> None:
    parts = [int(p) if p.isdigit() else p
             for p in path.replace("[", ".").replace("]", "").split(".")]
    for part in parts[:-1]:
        body = body[part]
    body[parts[-1]] = value


def test_every_field_of_the_chat_request_is_strictly_typed(gateway, schema) -> None:  # noqa: ANN001
    document = schema.raw_schema
    body_schema = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    fields = _fields(body_schema, body_schema.get("$defs", {}))
    assert {"max_tokens", "stream", "messages[0].content", "messages[0].content[0].text",
            "stream_options.include_usage"} <= {path for path, _ in fields}
    checked = 0
    with httpx.Client(base_url=gateway, timeout=TIMEOUT_S, headers=AUTH) as client:
        assert client.post("/v1/chat/completions", json=VALID_CHAT).status_code == 200
        for path, accepted in fields:
            for kind, wrong in SAMPLES.items():
                if kind in accepted:
                    continue
                body = json.loads(json.dumps(VALID_CHAT))
                _set(body, path, wrong)
                resp = client.post("/v1/chat/completions", json=body)
                assert resp.status_code == 400, (path, kind, resp.text)
                assert resp.json()["error"]["param"] == path, (path, kind, resp.text)
                checked += 1
    assert checked > 50


CHATSTREAM_FIELDS = {  # endpoint -> {field: JSON types it takes}; regenerate takes anything
    "/chat_stream": {"user_input": {"string", "null"}},
    "/set_generation_params": {"temperature": {"number", "integer", "null"},
                               "top_k_value": {"integer", "null"},
                               "top_p_value": {"number", "integer", "null"}},
    "/set_feedback": {"is_like": {"boolean"}, "message_id": {"string"}, "form_data": {"object"}},
}
CHATSTREAM_VALID = {"/chat_stream": {"user_input": "hi"}, "/set_generation_params": {},
                    "/set_feedback": {"is_like": True, "message_id": "m", "form_data": {}}}


@pytest.mark.parametrize("path", list(CHATSTREAM_FIELDS))
def test_every_chatstream_field_is_strictly_typed(gateway, path) -> None:  # noqa: ANN001
    with httpx.Client(base_url=gateway, timeout=TIMEOUT_S, headers=AUTH) as client:
        for field, accepted in CHATSTREAM_FIELDS[path].items():
            for kind, wrong in SAMPLES.items():
                if kind in accepted:
                    continue
                client.cookies.clear()
                resp = client.post(path, json={**CHATSTREAM_VALID[path], field: wrong})
                assert resp.status_code == 400, (path, field, kind, resp.text)
                assert resp.json()["error"]["param"] == field, (path, field, kind, resp.text)
