"""The body of `POST /v1/chat/completions`: its model, its limits, and the sampling it asks for.

Unknown request fields are ignored, as OpenAI's own clients send fields a server may not know;
known fields are validated and a bad one is a 400 that names it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chatstream_cluster.gateway.errors import APIError
from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams
from chatstream_cluster.shared.settings import GatewaySettings


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class RequestMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def to_chat(self) -> ChatMessage:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return ChatMessage(role=self.role, content=content or "")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that the cluster honours."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[RequestMessage], Field(min_length=1)]
    stream: bool = False
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
                param=f"messages.{i}.content",
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
