"""Resuming a stream (`Last-Event-ID: <stream id>:<n>`): exactly the rest, for its owner only.

A stream belongs to whoever started it (`Generation.owner`: the API key, the ChatStream
session, or `open` without keys); anyone else gets the same 404 as for an unknown stream.
What a resume finds (shared/job_state.py):

- `done`: the stored events after `n` are replayed at once — no permit, no worker. At or past
  the end (`n` >= the final event's number) only the end is sent.
- `queued` / `running`: this connection becomes the job's relay (its events come here now; the
  connection it replaces ends with a `stream_resumed_elsewhere` error, and its disconnect no
  longer stops the job); the stored events after `n` come first. The job runs once: a resume
  never starts a second run.
- `parked` (its client or gateway went away less than `--resume-window` ago): it is queued
  again and a worker continues it from prompt + text so far.
- `expired` (parked longer than the window): 410 `stream_expired`. Unknown: 404.

A live resume counts against the queue limit (it waits for the job's permit like a new
request; a running job already holds it, so that is at once) and against the per-key cap.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from chatstream_cluster.gateway.errors import APIError, redis_unavailable
from chatstream_cluster.gateway.metrics import RESUMES
from chatstream_cluster.shared.events import read_events
from chatstream_cluster.shared.job_state import Attach, new_token
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS
from chatstream_cluster.shared.schemas import JobSpec, TokenEvent

if TYPE_CHECKING:
    from chatstream_cluster.gateway.generation import Generation, ResumePoint

LAST_EVENT_ID = "Last-Event-ID"
_EVENT_ID = re.compile(r"^([0-9a-f]{32}):([0-9]{1,9})$")


def parse_last_event_id(value: str | None) -> ResumePoint | None:
    """`<stream id>:<n>` from a Last-Event-ID header; 400 when malformed."""
    from chatstream_cluster.gateway.generation import ResumePoint  # noqa: PLC0415

    if not value:
        return None
    match = _EVENT_ID.match(value.strip())
    if not match:
        raise APIError(
            400,
            "Last-Event-ID must be '<stream id>:<event number>' as sent in the stream's id: lines",
            code="invalid_last_event_id", param=LAST_EVENT_ID,
        )
    return ResumePoint(match.group(1), int(match.group(2)))


def not_found() -> APIError:
    RESUMES.labels(outcome="not_found").inc()
    return APIError(404, "unknown or expired stream; start a new request",
                    code="stream_not_found", param=LAST_EVENT_ID)


def expired(window: float) -> APIError:
    RESUMES.labels(outcome="expired").inc()
    return APIError(410, f"this stream stopped more than {window:g}s ago (the resume window) "
                    "and cannot be resumed; start a new request", code="stream_expired",
                    param=LAST_EVENT_ID)


async def start_resume(gen: Generation) -> None:
    """The start of a resuming connection (module docstring); raises APIError."""
    st, point = gen.state, gen.resume
    assert point is not None
    window = st.settings.resume_window
    try:
        peek = await st.states.peek(gen.job_id, window)
        if not peek.status or peek.owner != gen.owner:
            raise not_found()
        if peek.status == "expired":
            raise expired(window)
        stored = await read_events(st.redis, st.keys, gen.job_id)
        if peek.status == "done":
            _replay(gen, stored)
            return
        last = stored[-1].seq if stored else 0
        if point.seq > last:
            raise APIError(400, f"Last-Event-ID is past this stream's last event ({last})",
                           code="invalid_last_event_id", param=LAST_EVENT_ID)
        gen.refuse_if_draining()
        if peek.spec:  # the job's model, whatever the resuming request names
            gen.model = JobSpec.unpack(peek.spec).model or gen.model
        if peek.status == "parked":
            await st.workers.wait_for_worker(gen.model, st.settings.no_worker_timeout)
        await gen.take_permits()
        await gen.listen()
        outcome = await _attach(gen, peek.spec, requeue=peek.status == "parked")
    except TRANSIENT_REDIS_ERRORS:
        raise redis_unavailable() from None
    if outcome is Attach.DONE:  # it finished meanwhile: replay what is stored
        gen.replay_only = True
        _replay(gen, await read_events(st.redis, st.keys, gen.job_id))
        return
    if outcome is Attach.EXPIRED:
        raise expired(window)
    if outcome is Attach.UNKNOWN:
        raise not_found()
    RESUMES.labels(outcome=str(outcome)).inc()
    gen.inbox.mark_lost()  # read what is stored at once


async def requeue(gen: Generation) -> TokenEvent | None:
    """Queue a job the worker parked under a connection that still relays it; an error event
    when that is no longer possible (expired, or another connection took it over)."""
    st = gen.state
    _status, listener = await st.states.watch(gen.job_id)
    if listener != gen.listener:
        gen.superseded = True
        return gen.end_with_error("stream_resumed_elsewhere", "another connection resumed this "
                                "stream and relays it now")
    peek = await st.states.peek(gen.job_id, st.settings.resume_window)
    if peek.status != "parked":
        return None  # running again (another resume requeued it) or done: events follow
    outcome = await _attach(gen, peek.spec, requeue=True)
    if outcome in (Attach.REQUEUED, Attach.ATTACHED, Attach.DONE):
        RESUMES.labels(outcome="requeued_live").inc()
        return None
    return gen.end_with_error("stream_expired", "this stream could not be continued in time")


async def _attach(gen: Generation, spec: bytes, *, requeue: bool) -> Attach:
    """Make this connection the job's relay; for a parked job, first add the queue entry
    that the attach makes the valid one (so a job is never queued without an entry)."""
    st = gen.state
    outcome = Attach.NEEDS_ENTRY
    for _ in range(3):
        nonce, entry = "", None
        if requeue:
            nonce = new_token()
            entry = await st.queue(gen.model).add_entry(gen.job_id, spec, nonce)
        outcome = await st.states.attach(
            gen.job_id, owner=gen.owner, channel=st.dispatcher.reply_channel(gen.job_id),
            listener=gen.listener,
            window_s=st.settings.resume_window, nonce=nonce,
        )
        if entry is not None and outcome is not Attach.REQUEUED:
            await st.queue(gen.model).withdraw(entry)  # not the valid entry: unneeded
        if outcome is Attach.REQUEUED:
            gen.entry_id = entry
        if outcome is not Attach.NEEDS_ENTRY:
            return outcome
        requeue = True  # it was parked meanwhile
    return outcome


def _replay(gen: Generation, stored: list[TokenEvent]) -> None:
    """A finished stream: its stored events after the resume point, or only its end."""
    point = gen.resume
    assert point is not None
    final = stored[-1] if stored and stored[-1].finish_reason else None
    if final is None:
        raise not_found()  # the events expired before the meta did
    gen.replay_only = True
    RESUMES.labels(outcome="replayed").inc()
    if point.seq > final.seq:  # it saw the end already: only [DONE] is left
        gen.finish_reason, gen.error = final.finish_reason, final.error
        gen.tokens = final.tokens
        if final.usage is not None:
            gen.prompt_tokens = final.usage.prompt_tokens
        return
    for event in stored:
        if event.seq > point.seq:
            gen.order.take(event)
        elif event.seq == point.seq and event is final:  # its text was seen, not its end
            gen.order = type(gen.order)(point.seq)
            gen.order.take(event.model_copy(update={"text": ""}))
