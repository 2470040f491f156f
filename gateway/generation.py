"""The lifecycle of one generation on this gateway: admission, enqueue, events, cleanup.

`Generation.start()` waits for a live worker of the request's model (or, for a model with
none while `--cold-start-timeout` is on, for one to start: in the model's line), takes the
permits, enqueues the job in the model's queue (the dispatcher's subscription already exists)
and waits for the first event, so errors found before any text (queue full, prompt too long,
no worker) become plain HTTP errors. A resume
(`Last-Event-ID`) starts through gateway/resume.py instead. `events()` yields the job's events
in sequence order (gateway/event_order.py), reading the job's event stream when pub/sub lost
some. `close()` always runs (shielded from cancellation): stop the job if this connection still
relays it and it did not finish (it is parked, resumable for `--resume-window`), release the
permits, count, call the hooks.

Only `stop` and `length` are normal ends. Anything else a stream ends with — a worker's error,
no worker left, Redis gone for too long, another connection resuming the stream, a lapsed
permit — is an error the client sees as one (never a `stop`), and `outcome()` is
`unknown_error_occurred`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chatstream_cluster.gateway.disconnect import ClientDisconnected, run_until_disconnect
from chatstream_cluster.gateway.errors import APIError, as_api_error, describe, redis_unavailable
from chatstream_cluster.gateway.event_order import EventOrder
from chatstream_cluster.gateway.metrics import REQUESTS, TOKENS, TRUNCATED, TTFT
from chatstream_cluster.shared.events import read_events
from chatstream_cluster.shared.job_state import new_token
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS
from chatstream_cluster.shared.schemas import (
    ChatMessage,
    JobError,
    JobSpec,
    SamplingParams,
    TokenEvent,
)

if TYPE_CHECKING:
    from starlette.types import Receive

    from chatstream_cluster.gateway.admission import ExtraPermit
    from chatstream_cluster.gateway.dispatcher import JobInbox
    from chatstream_cluster.gateway.state import GatewayState

log = logging.getLogger("chatstream.gateway")

SUCCESS = "success"
DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
UNKNOWN_ERROR = "unknown_error_occurred"
NORMAL_ENDS = ("stop", "length")

SILENCE_CHECK_S = 1.0  # no event for this long: look in the event stream, check the job
NO_WORKER_GRACE_S = 3.0  # no live worker for this long mid-stream: end with an error
REDIS_DOWN_GRACE_S = 30.0
MAX_REQUEUES = 3  # parked under a live client (its events reached nobody) this often: give up
SUBSCRIBE_WAIT_S = 2.0  # a request waits this long for the gateway's pub/sub subscription
GAP_GIVE_UP_S = 10.0  # later events stored, an earlier one missing for this long: it is lost

CloseHook = Callable[["Generation", str], Awaitable[None]]


@dataclass(frozen=True)
class ResumePoint:
    """Where a resuming client is: the stream (job) id and the last event number it saw."""

    job_id: str
    seq: int


class Generation:
    """One stream of this gateway: admission, enqueue or resume, ordered events, cleanup."""

    def __init__(
        self,
        state: GatewayState,
        messages: list[ChatMessage],
        sampling: SamplingParams,
        *,
        model: str,
        route: str,
        owner: str = "open",
        request_id: str = "",
        return_prompt: bool = False,
        resume: ResumePoint | None = None,
    ) -> None:
        self.state = state
        self.job_id = resume.job_id if resume else uuid.uuid4().hex
        self.resume = resume
        self.owner = owner  # who may resume it: key:<api key id>, sid:<session id> or open
        self.listener = new_token()  # this connection, as the job's meta names its relay
        self.request_id = request_id or self.job_id
        self.model = model  # the served model; a resume takes its job's (gateway/resume.py)
        self.route = route
        self.messages = messages
        self.sampling = sampling
        self.return_prompt = return_prompt
        self.created = time.monotonic()
        self.close_hooks: list[CloseHook] = []
        # Caps besides the cluster's (per API key: Admission.extra_permits), taken before the
        # global permit, released in cleanup; their permit id is this connection's listener
        # token (a resume is a connection of its own), the global one's the job id.
        self.extra_permits: list[ExtraPermit] = []
        self.text = ""
        self.tokens = 0
        self.prompt_tokens = 0
        self.prompt: str | None = None
        self.finish_reason: str | None = None
        self.error: JobError | None = None
        self.replay_only = False  # a resume of a finished job: stored events, no permit
        self.superseded = False  # another connection resumed this stream and relays it now
        self.entry_id: str | None = None  # the queue entry this connection added
        self.inbox: JobInbox | None = None
        self.order = EventOrder(resume.seq + 1 if resume else 1)
        self.holds_permit = False
        self.requeues = 0
        self._first: TokenEvent | None = None
        self._ttft_seen = False
        self._local_end = False  # the end event was made here, not stored by a worker
        self._lapsed = False
        self._gap_since: float | None = None
        self._streaming = False
        self._closed = False

    @property
    def resuming(self) -> bool:
        return self.resume is not None

    @property
    def log_ctx(self) -> dict[str, str]:
        return {"request_id": self.request_id, "job_id": self.job_id, "model": self.model}

    # --- start -----------------------------------------------------------------------------
    async def start(self, receive: Receive | None) -> None:
        """Admit and enqueue (or resume); return at the first event. Raises APIError or
        ClientDisconnected (the caller must `close()` in every case)."""
        if receive is None:
            await self._start()
        else:
            await run_until_disconnect(receive, self._start())

    async def _start(self) -> None:
        if self.resume is not None:
            from chatstream_cluster.gateway.resume import start_resume  # noqa: PLC0415

            await start_resume(self)
        else:
            await self._start_new()
        if self.replay_only:
            self._first = self.order.pop()
            return
        log.info("job enqueued" if not self.resuming else "stream resumed", extra=self.log_ctx)
        deadline = time.monotonic() + self.state.settings.queue_timeout
        first = await self._next_event(deadline)
        if first is None:
            raise APIError(
                503, "no worker took the job in time; retry later", code="queue_timeout",
                headers={"Retry-After": "5"},
            )
        if first.finish_reason == "error" and not first.text and not self.resuming:
            err = first.error or JobError(code="worker_error", message="generation failed")
            self.finish_reason, self.error = "error", err
            raise APIError(
                err.status if 400 <= err.status < 600 else 500, err.message, code=err.code
            )
        self._first = first

    async def _start_new(self) -> None:
        st = self.state
        cold = st.cold_start(self.model)
        if cold and not st.workers.redis_ok:
            raise redis_unavailable()
        if not cold:
            await st.workers.wait_for_worker(self.model, st.settings.no_worker_timeout)
        self.refuse_if_draining()
        try:
            await self.take_permits(cold_start=cold)
            await self.listen()
            spec = JobSpec(
                job_id=self.job_id, reply_channel=st.dispatcher.reply_channel(self.job_id),
                messages=self.messages, model=self.model,
                sampling=self.sampling, created_ms=int(time.time() * 1000),
                return_prompt=self.return_prompt,
            )
            self.entry_id = await st.queue(self.model).enqueue(
                spec, owner=self.owner, listener=self.listener)
        except TRANSIENT_REDIS_ERRORS as exc:
            log.warning("redis unavailable at admission", extra={**self.log_ctx, "error": str(exc)})
            raise redis_unavailable() from None

    def refuse_if_draining(self) -> None:
        if self.state.draining:
            raise APIError(503, "this gateway is shutting down; retry", code="draining",
                           headers={"Retry-After": "1"})

    async def take_permits(self, *, cold_start: bool = False) -> None:
        """The caps of this connection (per key), then the job's permit of its model
        (idempotent: a resume of a running job finds the permit its job already holds)."""
        admission = self.state.admission
        for permit in self.extra_permits:
            await admission.acquire_extra(permit, self.listener, self.model)
        await admission.acquire(self.job_id, self.model, cold_start=cold_start)
        self.holds_permit = True
        admission.on_lapse(self.job_id, self._permit_lapsed)

    async def listen(self) -> None:
        """Route this job's events from the dispatcher to this connection (503 when the
        gateway's subscription is not there: the job's first events would be lost)."""
        if not await self.state.dispatcher.wait_connected(SUBSCRIBE_WAIT_S):
            raise redis_unavailable()
        self.inbox = await self.state.dispatcher.register(self.job_id)

    # --- events ----------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[TokenEvent]:
        """Every event of the stream from the first (or the resume point), in order; the last
        has finish_reason."""
        self._streaming = True
        event, self._first = self._first, None
        while event is not None:
            self._account(event)
            yield event
            if event.finish_reason:
                return
            if self.replay_only:
                event = self.order.pop()
                continue
            if event.parked:
                failure = await self._requeue_parked()
                if failure is not None:
                    event = failure
                    continue
            event = await self._next_event(None)

    def _account(self, event: TokenEvent) -> None:
        if event.text:
            if not self._ttft_seen:
                self._ttft_seen = True
                TTFT.labels(model=self.model).observe(time.monotonic() - self.created)
            self.text += event.text
        if event.tokens > self.tokens:
            TOKENS.labels(model=self.model).inc(event.tokens - self.tokens)
            self.tokens = event.tokens
        if event.prompt is not None:
            self.prompt = event.prompt
        if event.usage is not None:
            self.prompt_tokens = event.usage.prompt_tokens
        if event.finish_reason:
            self.finish_reason = event.finish_reason
            self.error = event.error

    async def _requeue_parked(self) -> TokenEvent | None:
        """The worker parked the job although this client is still here (its events reached
        nobody for a while): queue it again so it continues. An error event when it cannot."""
        from chatstream_cluster.gateway.resume import requeue  # noqa: PLC0415

        self.requeues += 1
        if self.requeues > MAX_REQUEUES:
            return self.end_with_error("stream_stalled", "the stream stalled repeatedly; resume it "
                                     "with Last-Event-ID or retry")
        try:
            return await requeue(self)
        except TRANSIENT_REDIS_ERRORS:
            return None  # the silence check retries once Redis answers

    async def repair(self) -> None:
        """Fill gaps from the job's event stream."""
        order = self.order
        for event in await read_events(
            self.state.redis, self.state.keys, self.job_id, after_seq=order.next_seq - 1
        ):
            order.take(event)

    async def _next_event(self, deadline: float | None) -> TokenEvent | None:
        """The next event in order; None when `deadline` passes first."""
        inbox, order = self.inbox, self.order
        assert inbox is not None
        silent_since = time.monotonic()
        no_worker_since: float | None = None
        while True:
            while inbox.events:
                order.take(inbox.events.popleft())
            if order.ready:
                return order.pop()
            if self._lapsed:
                return self.end_with_error("permit_lapsed", "this generation's permit lapsed "
                                         "(the gateway could not refresh it); retry")
            try:
                if inbox.maybe_lost or order.has_gap:
                    inbox.maybe_lost = False
                    await self.repair()
                    if order.ready:
                        continue
            except TRANSIENT_REDIS_ERRORS:
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
        """After a quiet second: repair a lost tail; end the stream when nothing can finish it
        here. Returns an error event to end with, or the time since which no worker is alive."""
        st = self.state
        try:
            await self.repair()
            if self.order.ready:
                return no_worker_since
            if self._gap_lost():
                return self.end_with_error("events_lost", "part of this stream was lost (Redis "
                                           "lost writes in a failover); retry the request")
            status, listener = await st.states.watch(self.job_id)
        except TRANSIENT_REDIS_ERRORS:
            if time.monotonic() - silent_since > REDIS_DOWN_GRACE_S:
                return self.end_with_error("redis_unavailable", "lost contact with Redis")
            return no_worker_since
        if listener and listener != self.listener:
            self.superseded = True
            return self.end_with_error("stream_resumed_elsewhere", "another connection resumed "
                                     "this stream and relays it now")
        if not status or status == "expired":
            return self.end_with_error("stream_expired", "this stream expired; start a new request")
        if status == "queued" and time.monotonic() - silent_since > st.settings.queue_timeout:
            return self.end_with_error("queue_timeout", "no worker continued this stream in time; "
                                     "resume it with Last-Event-ID or retry")
        if not st.workers.redis_ok or st.workers.live_for(self.model):
            return None
        now = time.monotonic()
        no_worker_since = no_worker_since or now
        if now - no_worker_since > NO_WORKER_GRACE_S:
            return self.end_with_error(
                "no_worker", "no worker is left to continue this generation; retry later"
            )
        return no_worker_since

    def _gap_lost(self) -> bool:
        """A gap that reading the job's stream has not filled for GAP_GIVE_UP_S: the missing
        events are gone (a failover lost a write), so the text can never be exact."""
        if not self.order.has_gap:
            self._gap_since = None
            return False
        now = time.monotonic()
        self._gap_since = self._gap_since or now
        return now - self._gap_since > GAP_GIVE_UP_S

    def end_with_error(self, code: str, message: str) -> TokenEvent:
        """An end made here (not by a worker): the job itself did not end."""
        log.warning(message, extra={**self.log_ctx, "code": code})
        self._local_end = True
        return TokenEvent(
            job_id=self.job_id, seq=self.order.next_seq, attempt=0, tokens=self.tokens,
            finish_reason="error", error=JobError(code=code, message=message, status=503),
        )

    def failed_to_start(self, code: str, message: str, status: int) -> JobError:
        """Record a start that failed after the answer began (gateway/cold_start.py): the
        stream ends with this error, and close() stops the job if it was enqueued."""
        self._local_end = True
        self.finish_reason, self.error = "error", JobError(code=code, message=message,
                                                           status=status)
        return self.error

    def _permit_lapsed(self) -> None:
        """Admission could not keep this job's permit: end the stream (the cap must hold)."""
        self._lapsed = True
        if self.inbox is not None:
            self.inbox.mark_lost()  # wake the relay

    # --- close -----------------------------------------------------------------------------
    def outcome(self) -> str:
        """The ChatStream callback status of a stream that ran to its end."""
        return SUCCESS if self.finish_reason in NORMAL_ENDS else UNKNOWN_ERROR

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
        ended_in_redis = self.finish_reason is not None and not self._local_end
        if self.inbox is not None and not ended_in_redis and not self.superseded:
            await self._stop_job()
        if self.inbox is not None:
            st.dispatcher.unregister(self.job_id, self.inbox)
        if self.holds_permit:
            st.admission.forget_lapse(self.job_id, self._permit_lapsed)
            if self.superseded:
                st.admission.disown(self.job_id)  # the connection that resumed it holds it
            else:
                await st.admission.release(self.job_id, self.model)
        for permit in self.extra_permits:
            await st.admission.release_extra(permit, self.listener)
        kind = status.split(",")[0]
        if self._streaming and self.finish_reason not in NORMAL_ENDS:
            if kind == DISCONNECTED_WHILE_STREAMING:
                reason = "client_disconnected"
            else:
                reason = self.error.code if self.error else (self.finish_reason or kind)
            TRUNCATED.labels(reason=reason).inc()
        REQUESTS.labels(route=self.route, status=label.split(",")[0]).inc()
        log.info("request closed", extra={**self.log_ctx, "status": status, "tokens": self.tokens,
                                          "finish_reason": self.finish_reason})
        for hook in self.close_hooks:
            try:
                await hook(self, status)
            except Exception:  # noqa: BLE001 - a hook must not break cleanup
                log.exception("close hook failed", extra=self.log_ctx)

    async def _stop_job(self) -> None:
        """Stop the job if this connection still relays it: the worker parks it (resumable
        within the resume window) and its GPU slot is free within a step."""
        st = self.state
        try:
            outcome = await st.states.cancel(self.job_id, self.listener)
            if outcome == "superseded":
                self.superseded = True  # a resume relays it now: leave its permit alone
            elif outcome == "running":
                await st.queue(self.model).broadcast_cancel(self.job_id)
            elif outcome == "parked" and self.entry_id is not None:
                await st.queue(self.model).withdraw(self.entry_id)  # never read: unneeded
        except TRANSIENT_REDIS_ERRORS as exc:
            log.warning("could not stop the job; it ends when its events reach nobody",
                        extra={**self.log_ctx, "error": str(exc)})


async def run_generation(gen: Generation, receive: Receive | None) -> None:
    """`gen.start()`, closing `gen` with the right status when it fails: the one place that
    turns a failed start into a close status (the ChatStream callback's
    `unknown_error_occurred,<code>: <message>`) and re-raises for the route to answer."""
    try:
        await gen.start(receive)
    except ClientDisconnected:
        await gen.close(DISCONNECTED_BEFORE_STREAMING)
        raise
    except Exception as exc:
        err = as_api_error(exc)
        await gen.close(UNKNOWN_ERROR, detail=describe(err), label=f"http_{err.status}")
        raise
    except BaseException:
        await gen.close(UNKNOWN_ERROR)
        raise
