"""`--model mock`: no torch; text that is a pure function of the prompt and the token position.

Token k of the reply to prompt P is a word picked by a hash of (P, k), so a continuation
from position k (another worker taking over) produces exactly the rest of the same text.

Echo: when the last message is a user message that starts with `echo: `, the reply is the rest
of that message, verbatim, one word (with the whitespace after it) per token, then it stops
(finish_reason "stop", like a model's end-of-sequence). Tests use it to send a known text
(markup, non-ASCII) through the whole pipeline.
"""

from __future__ import annotations

import hashlib
import heapq
import re
import threading
import time
from collections import deque
from dataclasses import dataclass

from chatstream_cluster.shared.schemas import JobError
from chatstream_cluster.worker.engine.faults import FaultPlan
from chatstream_cluster.worker.engine_api import EngineLoad, GenerationRequest, StepOutput

WORDS = (
    "the cluster streams tokens to many users at once while workers share one queue and "
    "gateways relay every reply in order with no gap and no repeat so nothing is lost "
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi"
).split()
MOCK_CONTEXT = 32768
ECHO_PREFIX = "echo: "
_ECHO_TOKEN = re.compile(r"\s*\S+\s*|\s+")


def render_prompt(messages: list) -> str:
    """The mock's chat template: one `role: content` line per message."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


def echo_tokens(messages: list) -> list[str] | None:
    """The echo reply's tokens, when the last message is a user's `echo: TEXT`; else None."""
    if not messages or messages[-1].role != "user":
        return None
    content = messages[-1].content
    if not content.startswith(ECHO_PREFIX):
        return None
    return _ECHO_TOKEN.findall(content[len(ECHO_PREFIX):])


def mock_token(prompt_digest: bytes, position: int) -> str:
    """Token `position` (0-based) of the reply to the prompt with this digest."""
    h = hashlib.blake2b(prompt_digest + position.to_bytes(8, "little"), digest_size=4).digest()
    return WORDS[int.from_bytes(h, "little") % len(WORDS)] + " "


def mock_tokens(prompt: str, n_tokens: int) -> list[str]:
    """The first `n_tokens` tokens of the reply to `prompt`, one string per token."""
    digest = hashlib.blake2b(prompt.encode(), digest_size=16).digest()
    return [mock_token(digest, k) for k in range(n_tokens)]


def mock_reply(prompt: str, n_tokens: int) -> str:
    """The first `n_tokens` tokens of the reply to `prompt` (for tests and benchmarks)."""
    return "".join(mock_tokens(prompt, n_tokens))


@dataclass
class _Sequence:
    request: GenerationRequest
    digest: bytes
    prompt: str
    prompt_tokens: int
    produced: int
    started: float
    text: str = ""
    sent_prompt: bool = False
    echo: list[str] | None = None


class MockEngine:
    """Engine protocol implementation at a set speed (`tokens_per_s` per sequence, 0 = max)."""

    model_name = "mock"

    def __init__(self, max_batch: int = 16, tokens_per_s: float = 0.0) -> None:
        self.max_batch = max_batch
        self.max_context = MOCK_CONTEXT
        self.tokens_per_s = tokens_per_s
        self._lock = threading.Lock()
        self._inbox: deque[GenerationRequest] = deque()
        self._cancelled: set[str] = set()
        self._active: dict[str, _Sequence] = {}
        self._wake = threading.Event()
        # Paced mode: (when the next token is due, tie-break, sequence), earliest first.
        self._schedule: list[tuple[float, int, _Sequence]] = []
        self._order = 0
        self.faults = FaultPlan.from_env()  # test only: worker/engine/faults.py

    def submit(self, request: GenerationRequest) -> None:
        with self._lock:
            self._inbox.append(request)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)
        self._wake.set()

    def has_work(self) -> bool:
        return bool(self._active or self._inbox)

    def close(self) -> None:
        self._wake.set()

    def reset(self) -> list[str]:
        """Drop every request (after a failed step); returns their ids."""
        with self._lock:
            dropped = [r.request_id for r in self._inbox] + list(self._active)
            self._inbox.clear()
            self._cancelled.clear()
            self._active.clear()
            self._schedule.clear()
        return dropped

    def load(self) -> EngineLoad:
        """Requests not yet admitted; the mock has no KV cache."""
        return EngineLoad(waiting=len(self._inbox))

    def _admit(self, out: list[StepOutput]) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            while self._inbox and len(self._active) < self.max_batch:
                req = self._inbox.popleft()
                prompt = render_prompt(req.messages)
                seq = _Sequence(
                    req,
                    hashlib.blake2b(prompt.encode(), digest_size=16).digest(),
                    prompt,
                    len(prompt.split()),
                    req.resume_tokens,
                    time.monotonic(),
                    echo=echo_tokens(req.messages),
                )
                self._active[req.request_id] = seq
                if self.tokens_per_s > 0:
                    self._schedule_next(seq)
            queued = [r for r in self._inbox if r.request_id in cancelled]
            for req in queued:
                self._inbox.remove(req)
                out.append(StepOutput(req.request_id, finish_reason="cancelled"))
        for rid in cancelled:
            seq = self._active.pop(rid, None)
            if seq:
                out.append(self._output(seq, "", "cancelled"))

    def _output(self, seq: _Sequence, text: str, finish: str | None) -> StepOutput:
        prompt = None
        if seq.request.return_prompt and not seq.sent_prompt:
            prompt, seq.sent_prompt = seq.prompt, True
        return StepOutput(
            seq.request.request_id,
            text=text,
            tokens=seq.produced,
            prompt_tokens=seq.prompt_tokens,
            finish_reason=finish,
            prompt=prompt,
        )

    def _is_active(self, seq: _Sequence) -> bool:
        return self._active.get(seq.request.request_id) is seq

    def _next_due(self, seq: _Sequence) -> float:
        """When the sequence's next token is due (paced mode)."""
        return seq.started + (seq.produced - seq.request.resume_tokens) / self.tokens_per_s

    def _due(self, seq: _Sequence, now: float) -> int:
        if self.tokens_per_s <= 0:
            return 1
        elapsed_tokens = int((now - seq.started) * self.tokens_per_s) + 1
        return max(0, seq.request.resume_tokens + elapsed_tokens - seq.produced)

    def _sleep_until_due(self) -> None:
        if self.tokens_per_s <= 0 or not self._active:
            return
        schedule = self._schedule
        while schedule and not self._is_active(schedule[0][2]):
            heapq.heappop(schedule)  # finished or cancelled
        if not schedule:
            return
        wait = schedule[0][0] - time.monotonic()
        if wait > 0:
            self._wake.wait(min(wait, 0.05))
            self._wake.clear()

    def _due_sequences(self, now: float) -> list[_Sequence]:
        """The sequences that get tokens this step: all at full speed, else those now due
        (popped from the schedule; a paced step costs the due sequences, not the batch)."""
        if self.tokens_per_s <= 0:
            return list(self._active.values())
        due = []
        schedule = self._schedule
        while schedule and schedule[0][0] <= now:
            _, _, seq = heapq.heappop(schedule)
            if self._is_active(seq):
                due.append(seq)
        return due

    def step(self) -> list[StepOutput]:
        out: list[StepOutput] = []
        self._sleep_until_due()
        self._admit(out)
        now = time.monotonic()
        due_now = self._due_sequences(now)
        if due_now and self.faults is not None:
            self.faults.before_forward()
        for seq in due_now:
            rid = seq.request.request_id
            if seq.prompt_tokens >= self.max_context:
                del self._active[rid]
                out.append(self._context_error(seq))
                continue
            due = self._due(seq, now)
            limit = seq.request.sampling.max_tokens
            text = ""
            finish = None
            echo = seq.echo
            for _ in range(due):
                if seq.produced >= limit or (echo is not None and seq.produced >= len(echo)):
                    break
                text += mock_token(seq.digest, seq.produced) if echo is None else echo[seq.produced]
                seq.produced += 1
            if echo is not None and seq.produced >= len(echo):
                finish = "stop"
            elif seq.produced >= limit:
                finish = "length"
            text, finish = self._apply_stop(seq, text, finish)
            if text or finish:
                out.append(self._output(seq, text, finish))
            if finish:
                del self._active[rid]
            elif self.tokens_per_s > 0:
                self._schedule_next(seq)
        return out

    def _schedule_next(self, seq: _Sequence) -> None:
        self._order += 1
        heapq.heappush(self._schedule, (self._next_due(seq), self._order, seq))

    def _apply_stop(self, seq: _Sequence, text: str, finish: str | None) -> tuple[str, str | None]:
        stops = seq.request.sampling.stop
        if not stops or not text:
            return text, finish
        before = len(seq.text)
        seq.text += text
        hits = [i for i in (seq.text.find(s, max(0, before - len(s))) for s in stops) if i >= 0]
        if hits:
            cut = min(hits)
            return seq.text[before:cut] if cut > before else "", "stop"
        return text, finish

    def _context_error(self, seq: _Sequence) -> StepOutput:
        msg = (
            f"prompt is {seq.prompt_tokens} tokens but the model's context is "
            f"{self.max_context} tokens"
        )
        return StepOutput(
            seq.request.request_id,
            prompt_tokens=seq.prompt_tokens,
            finish_reason="error",
            error=JobError(code="context_length_exceeded", message=msg, status=400),
        )
