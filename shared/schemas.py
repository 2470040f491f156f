"""Messages between gateways and workers: pydantic models, msgpack on the wire."""

from __future__ import annotations

from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length", "cancelled", "error"]


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class SamplingParams(BaseModel):
    """Per-request sampling; honoured inside a shared batch."""

    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None


class JobSpec(BaseModel):
    """A generation job as it sits in the job stream."""

    job_id: str
    reply_channel: str
    messages: list[ChatMessage]
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    model: str = ""
    created_ms: int = 0
    return_prompt: bool = False

    def pack(self) -> bytes:
        return msgpack.packb(self.model_dump(mode="python"), use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> JobSpec:
        """Decode and validate; raises ValueError (or pydantic's) on garbage."""
        return cls.model_validate(msgpack.unpackb(data, raw=False))


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class JobError(BaseModel):
    """Why a job ended with finish_reason "error"."""

    code: str
    message: str
    status: int = 500


class TokenEvent(BaseModel):
    """Everything new for one job since its previous event.

    `seq` counts events of the job from 1 with no gap across attempts; `attempt` is the
    fence. `tokens` is the completion token count so far. The last event has
    `finish_reason` ("stop", "length" or "error") and `usage`. `parked` marks the event a
    worker wrote when it stopped generating without finishing (nobody listened, or the
    client left): the job is resumable, and this is not an end.
    """

    job_id: str
    seq: int
    attempt: int
    text: str = ""
    tokens: int = 0
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: JobError | None = None
    prompt: str | None = None
    worker_id: str = ""
    parked: bool | None = None

    def pack(self) -> bytes:
        """msgpack of the fields that are not None (the wire form; see `unpack`)."""
        raw = {k: v for k, v in self.__dict__.items() if v is not None}
        if self.usage is not None:
            raw["usage"] = self.usage.model_dump()
        if self.error is not None:
            raw["error"] = self.error.model_dump()
        return msgpack.packb(raw, use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> TokenEvent:
        """Decode an event from a worker without validating it again.

        Trusted, internal data on the gateway's hot path (one call per event): the instance is
        built the way `model_construct` builds it, without its per-field work (~1 us instead of
        ~6 us). Unknown keys (a newer worker) are ignored, missing ones take their defaults.
        """
        raw: dict[str, Any] = msgpack.unpackb(data, raw=False)
        values = dict(_EVENT_DEFAULTS)
        for key, value in raw.items():
            if key in values:
                values[key] = value
        if "job_id" not in raw or "seq" not in raw or "attempt" not in raw:
            raise ValueError("token event without job_id, seq or attempt")
        usage, error = values["usage"], values["error"]
        if usage is not None:
            values["usage"] = Usage.model_construct(**usage)
        if error is not None:
            values["error"] = JobError.model_construct(**error)
        event = cls.__new__(cls)
        _set = object.__setattr__
        _set(event, "__dict__", values)
        _set(event, "__pydantic_fields_set__", raw.keys() & values.keys())
        _set(event, "__pydantic_extra__", None)
        _set(event, "__pydantic_private__", None)
        return event


# Every field of TokenEvent with its default; the three required ones are always sent.
_EVENT_DEFAULTS: dict[str, Any] = {
    name: None if field.is_required() else field.default
    for name, field in TokenEvent.model_fields.items()
}


class WorkerInfo(BaseModel):
    """A worker's registry entry."""

    id: str
    pid: int
    host: str
    model: str  # the served name: its job queue, capacity and metrics label
    device: str
    max_batch: int
    running: int = 0
    max_context: int = 0
    started_ms: int = 0
    draining: bool = False
    gpus: list[dict[str, Any]] = Field(default_factory=list)
    cpu: dict[str, Any] = Field(default_factory=dict)
    tokens_per_s: float = 0.0
    waiting: int = 0  # requests inside the worker not yet running (no batch slot or KV cache)
    kv_tokens_used: int = 0  # KV cache tokens reserved by running requests
    kv_tokens_total: int = 0  # KV cache size in tokens (0: the engine has none, e.g. mock)


class GatewayInfo(BaseModel):
    """A gateway's registry entry: who it is and the admission settings it enforces."""

    id: str
    pid: int
    host: str
    max_concurrent: int = 0  # per model; 0 = derived from the model's live workers
    max_queue: int = 0  # per model
    models: list[str] = Field(default_factory=list)  # declared (--models): known with no worker
    started_ms: int = 0
    draining: bool = False


class ControlMessage(BaseModel):
    """Gateway -> workers broadcast."""

    kind: Literal["cancel"]
    job_id: str

    def pack(self) -> bytes:
        return msgpack.packb(self.model_dump(), use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> ControlMessage:
        return cls.model_validate(msgpack.unpackb(data, raw=False))
