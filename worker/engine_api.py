"""The contract between the worker loop and a generation engine (HF model or mock).

The loop owns one engine thread that calls `step()` while `has_work()`; `submit()` and
`cancel()` are called from other threads and must be thread-safe (engines keep an inbox that
`step()` drains first). When `step()` raises, the loop calls `reset()` and hands the requests
it names to another attempt. An engine never touches Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from chatstream_cluster.shared.schemas import ChatMessage, JobError, SamplingParams


@dataclass
class GenerationRequest:
    """One sequence to generate.

    `resume_text`/`resume_tokens` continue a sequence another worker started: the engine
    generates as if the reply so far were `resume_text` (`resume_tokens` tokens long) and
    counts tokens and `max_tokens` from there.
    """

    request_id: str
    messages: list[ChatMessage]
    sampling: SamplingParams
    resume_text: str = ""
    resume_tokens: int = 0
    return_prompt: bool = False


@dataclass
class StepOutput:
    """What one step produced for one request.

    `text` is new text since the previous output (never a split UTF-8 character, never text
    past a stop string). `tokens` is the completion token count so far, resume included.
    An output with `finish_reason` is the request's last; after it the engine forgets the
    request. `finish_reason` is "stop", "length", "cancelled" or "error" (with `error`).
    """

    request_id: str
    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None
    error: JobError | None = None
    prompt: str | None = None
    extra: dict = field(default_factory=dict)


class UnsupportedModel(ValueError):
    """The engine cannot serve this model (or these settings) correctly; the message says why.
    Raised at start-up, so the worker exits with it instead of serving wrong text."""


@dataclass
class EngineLoad:
    """What an engine reports in the worker's heartbeat: requests waiting inside it (for a
    batch slot or KV cache) and the KV cache's tokens in use (reserved) and in total."""

    waiting: int = 0
    kv_tokens_used: int = 0
    kv_tokens_total: int = 0


class Engine(Protocol):
    """A generation engine that runs all its active sequences together."""

    model_name: str
    max_batch: int
    max_context: int

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; it joins the batch at the next step (thread-safe). It may render
        and tokenize the prompt first: call it off the event loop and off the engine thread."""

    def cancel(self, request_id: str) -> None:
        """Drop a request at the next step; it ends with finish_reason "cancelled"
        (thread-safe; unknown ids are ignored)."""

    def has_work(self) -> bool:
        """True while any request is queued, running or has undelivered output."""

    def step(self) -> list[StepOutput]:
        """Run one step for every active sequence; called from the engine thread only."""

    def reset(self) -> list[str]:
        """After `step()` raised: drop every request and free what they held (KV cache);
        returns their ids, which get no further output (engine thread only)."""

    def load(self) -> EngineLoad:
        """Requests waiting inside the engine and KV cache use (any thread)."""

    def close(self) -> None:
        """Free the model and any background resources."""
