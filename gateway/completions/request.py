"""The body of `POST /v1/chat/completions`: its model, its limits, and the sampling it asks for.

Known fields are strictly typed, as in OpenAI's API: `"max_tokens": "5"` or `true` is a 400 that
names the field as the client wrote it (`max_tokens`, `messages[0].content`; see
gateway/validation.py), never coerced. Parameters the cluster does not implement (`UNSUPPORTED`:
tools, logprobs, n > 1, ...) are a 400 `unsupported_parameter` when they ask for something,
instead of being ignored. Other unknown fields are ignored, as OpenAI's own clients send fields
a server may not know (`user`, `metadata`, `store`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chatstream_cluster.gateway.errors import APIError
from chatstream_cluster.gateway.validation import json_type, request_error
from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams
from chatstream_cluster.shared.settings import GatewaySettings

STRICT = ConfigDict(extra="ignore", strict=True)


class ContentPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class RequestMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def to_chat(self) -> ChatMessage:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return ChatMessage(role=self.role, content=content or "")


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that the cluster honours."""

    model_config = STRICT

    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[RequestMessage], Field(min_length=1)]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=100_000)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    n: int | None = Field(None, ge=1, le=1)
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if isinstance(value, str):
            value = [value]
        if value is not None and any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value


def _asks(*harmless: Any) -> Callable[[Any], bool]:
    """A test for a parameter's value: does it ask for something (not null, not `harmless`)?"""
    return lambda value: value is not None and all(
        value != h or type(value) is not type(h) for h in harmless)


#: Parameters of OpenAI's API the cluster does not implement, each with a test of whether a
#: value asks for the feature (null, and the values that mean "off", are accepted).
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (_asks([]), "tool calling is not implemented"),
    "tool_choice": (_asks("none"), "tool calling is not implemented; only 'none' is accepted"),
    "functions": (_asks([]), "function calling is not implemented"),
    "function_call": (_asks("none"), "function calling is not implemented; only 'none' is "
                      "accepted"),
    "logprobs": (_asks(False), "log probabilities are not returned"),
    "top_logprobs": (_asks(0), "log probabilities are not returned"),
    "n": (_asks(1), "one choice per request is supported, not more: send n = 1"),
    "logit_bias": (_asks({}), "logit_bias is not implemented"),
    "presence_penalty": (_asks(0, 0.0), "presence_penalty is not implemented; send 0"),
    "frequency_penalty": (_asks(0, 0.0), "frequency_penalty is not implemented; send 0"),
    "response_format": (_asks({"type": "text"}), "structured output (response_format) is not "
                        "implemented; only {'type': 'text'} is accepted"),
    "modalities": (_asks(["text"]), "only text output is implemented, not audio"),
    "audio": (_asks(), "audio output is not implemented"),
    "prediction": (_asks(), "predicted outputs are not implemented"),
    "web_search_options": (_asks(), "web search is not implemented"),
}


def parse_request(body: Any) -> ChatCompletionRequest:
    """The validated request; 400 for a wrong type or value (naming the field as the client
    wrote it) and for a parameter the cluster does not implement."""
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, not {json_type(body)}",
                       code="invalid_json")
    for name, (asks, why) in UNSUPPORTED.items():
        if name in body and asks(body[name]):
            raise APIError(400, f"Unsupported parameter: '{name}': {why}.",
                           code="unsupported_parameter", param=name)
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise request_error(exc, ChatCompletionRequest) from None


def check_limits(req: ChatCompletionRequest, s: GatewaySettings) -> None:
    """400 for a request past the gateway's limits (messages, lengths, stop strings)."""
    if len(req.messages) > s.max_messages:
        raise APIError(
            400,
            f"at most {s.max_messages} messages are allowed",
            code="too_many_messages",
            param="messages",
        )
    for i, msg in enumerate(req.messages):
        text = msg.to_chat().content
        if len(text) > s.max_message_chars:
            raise APIError(
                400,
                f"message {i} is longer than {s.max_message_chars} characters",
                code="message_too_long",
                param=f"messages[{i}].content",
            )
    stops = req.stop or []
    if len(stops) > s.max_stop:
        raise APIError(
            400,
            f"at most {s.max_stop} stop strings are allowed",
            code="too_many_stop",
            param="stop",
        )
    if any(len(x) > s.max_stop_chars for x in stops):
        raise APIError(
            400,
            f"stop strings may be at most {s.max_stop_chars} characters",
            code="stop_too_long",
            param="stop",
        )


def sampling_from(req: ChatCompletionRequest, s: GatewaySettings) -> SamplingParams:
    """Sampling params of a request, with the server's default and ceiling for max_tokens."""
    default = min(s.default_max_tokens, s.max_tokens_limit)
    max_tokens = req.max_completion_tokens or req.max_tokens or default
    if max_tokens > s.max_tokens_limit:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise APIError(
            400,
            f"{param} may be at most {s.max_tokens_limit}",
            code="max_tokens_too_large",
            param=param,
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        stop=req.stop or [],
        seed=req.seed,
    )
