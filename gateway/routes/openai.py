"""OpenAI-compatible API: `POST /v1/chat/completions` (SSE or JSON) and `GET /v1/models`.

The request and its validation are gateway/completions/request.py; the SSE and JSON answers
gateway/completions/encode.py. A stream resumes after a lost connection with `Last-Event-ID`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from chatstream_cluster.gateway.auth import api_key_id
from chatstream_cluster.gateway.body import read_json
from chatstream_cluster.gateway.cold_start import cold_start_events
from chatstream_cluster.gateway.completions.encode import SSE_HEADERS, collect, sse_events
from chatstream_cluster.gateway.completions.request import (
    ChatCompletionRequest,
    check_limits,
    parse_request,
    sampling_from,
)
from chatstream_cluster.gateway.disconnect import ClientDisconnected, run_until_disconnect
from chatstream_cluster.gateway.errors import APIError
from chatstream_cluster.gateway.generation import (
    DISCONNECTED_WHILE_STREAMING,
    Generation,
    run_generation,
)
from chatstream_cluster.gateway.request_id import client_request_id
from chatstream_cluster.gateway.resume import parse_last_event_id
from chatstream_cluster.gateway.state import GatewayState
from chatstream_cluster.gateway.streaming import GenerationResponse

router = APIRouter()


def resolve_model(requested: str, state: GatewayState) -> str:
    """The served model a request names; 404 for a model the cluster does not know. A cluster
    that knows no model yet (no worker ever served, none declared) lets the request through:
    its start answers 503 `no_worker` after `--no-worker-timeout`."""
    known = state.workers.known_models
    if requested in known or not known:
        return requested
    raise APIError(
        404,
        f"model {requested!r} does not exist; available: {', '.join(sorted(known))}",
        code="model_not_found",
        param="model",
    )


# The route reads the raw body (limits before parsing), so its schema is declared here; the
# $refs point into this spot of the OpenAPI document, where the $defs land.
@router.post(
    "/v1/chat/completions",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": ChatCompletionRequest.model_json_schema(ref_template=(
            "#/paths/~1v1~1chat~1completions/post/requestBody/content/application~1json/schema"
            "/$defs/{model}"))}}}},
)
async def chat_completions(request: Request) -> Any:
    """Create a chat completion; `stream: true` answers with server-sent events."""
    state: GatewayState = request.app.state.gateway
    req = parse_request(await read_json(request, state.settings.max_body_bytes))
    check_limits(req, state.settings)
    sampling = sampling_from(req, state.settings)
    model = resolve_model(req.model, state)
    resume = parse_last_event_id(request.headers.get("last-event-id"))
    if resume and not req.stream:
        raise APIError(
            400,
            "Last-Event-ID resumes streams only; set stream: true",
            code="invalid_last_event_id",
            param="Last-Event-ID",
        )
    key_id = api_key_id(request)
    gen = Generation(
        state,
        [m.to_chat() for m in req.messages],
        sampling,
        model=model,
        route="openai",
        owner=f"key:{key_id}" if key_id else "open",
        request_id=client_request_id(request),
        resume=resume,
    )
    gen.extra_permits = state.admission.extra_permits(key_id)
    headers = {"X-Request-ID": gen.request_id}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream and not resume and state.cold_start(model):
        # No worker of the model yet: answer now, keep the line alive while one starts.
        return GenerationResponse(gen, cold_start_events(gen, model, include_usage),
                                  "text/event-stream", headers={**SSE_HEADERS, **headers})
    await run_generation(gen, request.receive)
    if req.stream:
        return GenerationResponse(
            gen,
            sse_events(gen, model, include_usage),
            "text/event-stream",
            headers={**SSE_HEADERS, **headers},
        )
    try:
        result = await run_until_disconnect(request.receive, collect(gen, model))
    except ClientDisconnected:
        await gen.close(DISCONNECTED_WHILE_STREAMING)
        raise
    except BaseException:
        await gen.close(gen.outcome() if gen.finish_reason else "unknown_error_occurred")
        raise
    await gen.close(gen.outcome())
    return JSONResponse(result, headers=headers)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The models a live worker serves now (a known model with none is left out)."""
    state: GatewayState = request.app.state.gateway
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "chatstream-cluster"}
            for name in state.served_models()
        ],
    }
