"""One generation from admission to cleanup, and the ordered, gap-free stream of its events.

`Generation.start()` waits for a live worker, takes a permit, enqueues the job (the
dispatcher's subscription already exists) and waits for the first event, so errors found
before any text (queue full, prompt too long, no worker) become plain HTTP errors.
`events()` yields events strictly in sequence order: duplicates are dropped and gaps (lost
pub/sub messages) are filled from the job's event stream. `close()` always runs (shielded from
cancellation): cancel the job if unfinished, release the permit, count, call the hooks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from chatstream_cluster.gateway.disconnect import ClientDisconnected, run_until_disconnect
from chatstream_cluster.gateway.errors import APIError, redis_unavailable
from chatstream_cluster.gateway.metrics import REQUESTS, TOKENS, TTFT
from chatstream_cluster.shared.events import read_events
from chatstream_cluster.shared.jobqueue import UNKNOWN
from chatstream_cluster.shared.redis_client import REDIS_ERRORS
from chatstream_cluster.shared.schemas import (
    ChatMessage,
    JobError,
    JobSpec,
    SamplingParams,
    TokenEvent,
)
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from chatstream_cluster.gateway.admission import ExtraPermit
    from chatstream_cluster.gateway.state import GatewayState
    from starlette.types import Receive

log = logging.getLogger("chatstream.gateway")

SUCCESS = "success"
DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
UNKNOWN_ERROR = "unknown_error_occurred"

SILENCE_CHECK_S = 1.0  # no event for this long: look in the event stream, check the workers
NO_WORKER_GRACE_S = 3.0  # no live worker for this long mid-stream: end with an error
REDIS_DOWN_GRACE_S = 30.0

CloseHook = Callable[["Generation", str], Awaitable[None]]


class Generation:
    """One job of this gateway: admission, enqueue, ordered events, cleanup."""

    def __init__(
        self,
        state: GatewayState,
        messages: list[ChatMessage],
        sampling: SamplingParams,
        *,
        route: str,
        request_id: str = "",
        return_prompt: bool = False,
        resume: tuple[str, int] | None = None,
    ) -> None:
        self.state = state
        self.job_id = resume[0] if resume else uuid.uuid4().hex
        self.resuming = resume is not None
        self.request_id = request_id or self.job_id
        self.route = route
        self.messages = messages
        self.sampling = sampling
        self.return_prompt = return_prompt
        self.created = time.monotonic()
        self.close_hooks: list[CloseHook] = []
        # Caps besides the cluster's (per API key, per session: admission.limit_permits), taken
        # before the global permit, released in cleanup; the permit id is the job id.
        self.extra_permits: list[ExtraPermit] = []
        self.text = ""
        self.tokens = 0
        self.prompt_tokens = 0
        self.prompt: str | None = None
        self.finish_reason: str | None = None
        self.error: JobError | None = None
        self._entry_id: str | None = None
        self._inbox = None
        self._next_seq = resume[1] + 1 if resume else 1
        self._resume_floor = 0  # stored events up to here may end in a stale "cancelled"
        self._held: dict[int, TokenEvent] = {}
        self._ready: list[TokenEvent] = []
        self._first: TokenEvent | None = None
        self._ttft_seen = False
        self._closed = False

    @property
    def log_ctx(self) -> dict[str, str]:
        return {"request_id": self.request_id, "job_id": self.job_id}

    # --- start -----------------------------------------------------------------------------
    async def start(self, receive: Receive | None) -> None:
        """Admit and enqueue; return at the first event. Raises APIError or ClientDisconnected
        (the caller must `close()` in every case)."""
        if receive is None:
            await self._start()
        else:
            await run_until_disconnect(receive, self._start())

    async def _start(self) -> None:
        st = self.state
        await st.workers.wait_for_worker(st.settings.no_worker_timeout)
        if st.draining:
            raise APIError(
                503,
                "this gateway is shutting down; retry",
                code="draining",
                headers={"Retry-After": "1"},
            )
        try:
            for permit in self.extra_permits:
                await st.admission.acquire_extra(permit, self.job_id)
            await st.admission.acquire(self.job_id)
            if not st.dispatcher.connected.is_set():
                raise redis_unavailable()
            self._inbox = await st.dispatcher.register(self.job_id)
            if self.resuming:
                await self._resubmit()
            else:
                await self._enqueue()
        except (*REDIS_ERRORS, RedisError) as exc:
            log.warning("redis unavailable at admission", extra={**self.log_ctx, "error": str(exc)})
            raise redis_unavailable() from None
        log.info("job enqueued", extra=self.log_ctx)
        deadline = time.monotonic() + st.settings.queue_timeout
        first = await self._next_event(deadline)
        if first is None:
            raise APIError(
                503,
                "no worker took the job in time; retry later",
                code="queue_timeout",
                headers={"Retry-After": "5"},
            )
        if first.finish_reason == "error" and not first.text:
            err = first.error or JobError(code="worker_error", message="generation failed")
            self.finish_reason, self.error = "error", err
            raise APIError(
                err.status if 400 <= err.status < 600 else 500, err.message, code=err.code
            )
        self._first = first

    async def _enqueue(self) -> None:
        st = self.state
        spec = JobSpec(
            job_id=self.job_id,
            reply_channel=st.dispatcher.reply_channel(self.job_id),
            messages=self.messages,
            sampling=self.sampling,
            created_ms=int(time.time() * 1000),
            return_prompt=self.return_prompt,
        )
        self._entry_id = await st.queue.enqueue(spec)

    async def _resubmit(self) -> None:
        """Continue a job a client resumes (Last-Event-ID): queue it again unless it finished."""
        st = self.state
        spec = await st.queue.stored_spec(self.job_id)
        if spec is None:
            raise APIError(
                404,
                "unknown or expired stream; start a new request",
                code="stream_not_found",
                param="Last-Event-ID",
            )
        stored = await read_events(st.redis, st.keys, self.job_id)
        self._resume_floor = stored[-1].seq if stored else 0
        spec = spec.model_copy(
            update={
                "reply_channel": st.dispatcher.reply_channel(self.job_id),
                "return_prompt": False,
            }
        )
        result, self._entry_id = await st.queue.resubmit(spec)
        if result == UNKNOWN:
            raise APIError(
                404,
                "unknown or expired stream; start a new request",
                code="stream_not_found",
                param="Last-Event-ID",
            )
        self._inbox.mark_lost()  # read what is stored at once

    # --- events ----------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[TokenEvent]:
        """Every event of the job from the first, in order; the last has finish_reason."""
        event = self._first
        self._first = None
        while event is not None:
            self._account(event)
            yield event
            if event.finish_reason:
                return
            event = await self._next_event(None)

    def _account(self, event: TokenEvent) -> None:
        if event.text:
            if not self._ttft_seen:
                self._ttft_seen = True
                TTFT.observe(time.monotonic() - self.created)
            self.text += event.text
        if event.tokens > self.tokens:
            TOKENS.inc(event.tokens - self.tokens)
            self.tokens = event.tokens
        if event.prompt is not None:
            self.prompt = event.prompt
        if event.usage is not None:
            self.prompt_tokens = event.usage.prompt_tokens
        if event.finish_reason:
            self.finish_reason = event.finish_reason
            self.error = event.error

    def _take(self, event: TokenEvent) -> None:
        if event.seq < self._next_seq or event.seq in self._held:
            return  # duplicate (repair and pub/sub both delivered it)
        if event.finish_reason == "cancelled" and event.seq <= self._resume_floor:
            event = event.model_copy(update={"finish_reason": None, "usage": None})
        self._held[event.seq] = event
        while self._next_seq in self._held:
            self._ready.append(self._held.pop(self._next_seq))
            self._next_seq += 1

    async def _repair(self) -> None:
        """Fill gaps from the job's event stream."""
        for event in await read_events(
            self.state.redis, self.state.keys, self.job_id, after_seq=self._next_seq - 1
        ):
            self._take(event)

    async def _next_event(self, deadline: float | None) -> TokenEvent | None:
        """The next event in order; None when `deadline` passes first."""
        inbox = self._inbox
        silent_since = time.monotonic()
        no_worker_since: float | None = None
        while True:
            while inbox.events:
                self._take(inbox.events.popleft())
            if self._ready:
                return self._ready.pop(0)
            try:
                if inbox.maybe_lost or self._held:
                    inbox.maybe_lost = False
                    await self._repair()
                    if self._ready:
                        continue
            except (*REDIS_ERRORS, RedisError):
                pass
            timeout = SILENCE_CHECK_S
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    return None
            if await inbox.wait(timeout):
                continue
            failure = await self._check_silence(silent_since, no_worker_since)
            if isinstance(failure, TokenEvent):
                return failure
            no_worker_since = failure

    async def _check_silence(self, silent_since: float, no_worker_since: float | None):
        """After a quiet second: repair a lost tail; end the stream when nothing can finish it.

        Returns an error event to end with, or the time since which no worker is alive."""
        workers = self.state.workers
        try:
            await self._repair()
        except (*REDIS_ERRORS, RedisError):
            if time.monotonic() - silent_since > REDIS_DOWN_GRACE_S:
                return self._error_event("redis_unavailable", "lost contact with Redis")
            return no_worker_since
        if self._ready or not workers.redis_ok:
            return no_worker_since
        if workers.workers:
            return None
        now = time.monotonic()
        no_worker_since = no_worker_since or now
        if now - no_worker_since > NO_WORKER_GRACE_S:
            return self._error_event(
                "no_worker", "no worker is left to continue this generation; retry later"
            )
        return no_worker_since

    def _error_event(self, code: str, message: str) -> TokenEvent:
        log.warning(message, extra=self.log_ctx)
        return TokenEvent(
            job_id=self.job_id,
            seq=self._next_seq,
            attempt=0,
            tokens=self.tokens,
            finish_reason="error",
            error=JobError(code=code, message=message, status=503),
        )

    # --- close -----------------------------------------------------------------------------
    def outcome(self) -> str:
        """The ChatStream callback status of a generation that ran to its end."""
        return UNKNOWN_ERROR if self.finish_reason == "error" else SUCCESS

    async def close(self, status: str, *, detail: str = "", label: str = "") -> None:
        """Clean up once; runs to completion even if the caller is cancelled.

        Hooks get `status`, with `,detail` appended when given (as ChatStream does); the
        requests metric counts `label` (default: the status)."""
        if self._closed:
            return
        self._closed = True
        if detail:
            status = f"{status},{detail}"
        task = asyncio.get_running_loop().create_task(self._cleanup(status, label or status))
        self.state.background.add(task)
        task.add_done_callback(self.state.background.discard)
        await asyncio.shield(task)

    async def _cleanup(self, status: str, label: str) -> None:
        st = self.state
        unfinished = self._entry_id is not None and self.finish_reason is None
        try:
            if unfinished:
                await st.queue.cancel(self.job_id)
                if self._ready == [] and self.tokens == 0 and not self.text:
                    await st.queue.withdraw(self._entry_id)
        except (*REDIS_ERRORS, RedisError) as exc:
            log.warning("could not cancel job", extra={**self.log_ctx, "error": str(exc)})
        st.dispatcher.unregister(self.job_id)
        await st.admission.release(self.job_id)
        for permit in self.extra_permits:
            await st.admission.release_extra(permit, self.job_id)
        REQUESTS.labels(route=self.route, status=label.split(",")[0]).inc()
        log.info("request closed", extra={**self.log_ctx, "status": status, "tokens": self.tokens})
        for hook in self.close_hooks:
            try:
                await hook(self, status)
            except Exception:  # noqa: BLE001 - a hook must not break cleanup
                log.exception("close hook failed", extra=self.log_ctx)


async def run_generation(gen: Generation, receive: Receive | None) -> None:
    """`gen.start()`, closing `gen` with the right status when it fails."""
    try:
        await gen.start(receive)
    except ClientDisconnected:
        await gen.close(DISCONNECTED_BEFORE_STREAMING)
        raise
    except APIError as exc:
        await gen.close(
            UNKNOWN_ERROR, detail=exc.code or str(exc.status), label=f"http_{exc.status}"
        )
        raise
    except BaseException:
        await gen.close(UNKNOWN_ERROR)
        raise

