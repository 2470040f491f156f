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
import uuid
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
from tests.cluster import Cluster

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
    procs = Cluster(redis_server.url, "t" + uuid.uuid4().hex[:10],
                    tmp_path_factory.mktemp("fuzz"))
    try:
        procs.start_worker("mock", max_batch=8)
        gw = procs.start_gateway(**GATEWAY)
        procs.wait_ready(gw)
        yield gw.url
    finally:
        procs.stop()


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
