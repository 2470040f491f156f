"""The worker's publisher: engine output in, one fenced event per job per round out.

The engine thread hands every step's output to `coalesce()`; it is merged per job until the
publisher's next round, so generation never waits on Redis. A round sends one event per job
with new output, pipelined (shared/events.py). A failed round is retried verbatim (same seqs,
same text) before anything newer, so a write that reached Redis but not its reply is neither
lost nor changed (the retry finds it stored: DUPLICATE).

How a job leaves: its final event (stop, length, error) makes it `done`; a job this worker
stops generating without finishing — its gateway cancelled it (the client left), or nobody
has heard its events for `--no-subscriber-timeout` (the gateway died) — gets a park event:
the text so far is stored, the job is `parked`, and a resume within the gateways'
`--resume-window` continues it from there (shared/job_state.py). A job another worker took
over (a fenced write) is dropped here without a word.

The publisher reaches the rest of the worker only through `JobHost`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from chatstream_cluster.shared.events import CANCELLED, FENCED, EventWriter, PendingPublish
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS, reraise_if_cancelling
from chatstream_cluster.shared.schemas import JobError, JobSpec, TokenEvent, Usage
from chatstream_cluster.worker.engine_api import StepOutput

log = logging.getLogger("chatstream.worker")

NORMAL_ENDS = ("stop", "length", "error")


@dataclass
class ActiveJob:
    """A job this worker is generating."""

    entry_id: str
    spec: JobSpec
    attempt: int
    seq: int
    tokens: int = 0
    prompt_tokens: int = 0
    unheard_since: float | None = None
    dropping: bool = False


@dataclass
class Pending:
    """Output of one job not yet published (coalesced across engine steps)."""

    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None
    error: JobError | None = None
    prompt: str | None = None

    def merge(self, out: StepOutput | Pending) -> None:
        """Add output produced after this (an engine step's, or newer pending output)."""
        self.text += out.text
        self.tokens = max(self.tokens, out.tokens)
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.finish_reason = out.finish_reason or self.finish_reason
        self.error = out.error or self.error
        self.prompt = out.prompt if out.prompt is not None else self.prompt


class JobHost(Protocol):
    """What the publisher needs from the worker."""

    id: str
    active: dict[str, ActiveJob]

    def drop(self, job: ActiveJob) -> None:
        """Stop generating `job` (the engine ends it with a "cancelled" output)."""

    async def finish_local(self, job: ActiveJob, *, ack: bool) -> None:
        """Forget `job` here; `ack` removes its queue entry (False: another worker has it)."""

    def count_tokens(self, n: int) -> None:
        """`n` more completion tokens were published."""


class Publisher:
    """Coalesces engine output per job and publishes it in rounds (module docstring)."""

    def __init__(self, writer: EventWriter, host: JobHost, no_subscriber_timeout: float) -> None:
        self.writer = writer
        self.host = host
        self.no_subscriber_timeout = no_subscriber_timeout
        self.stopping = False
        self._pending: dict[str, Pending] = {}
        self._lock = threading.Lock()
        self._dirty = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # A round not yet written (kept here, so a restarted `run` sends it first, verbatim).
        self._retry: list[tuple[PendingPublish, Pending]] = []

    # --- any thread --------------------------------------------------------------------------
    def coalesce(self, outputs: Sequence[StepOutput]) -> None:
        """Merge outputs into their jobs' pending events (one lock round for a whole step)."""
        if not outputs:
            return
        with self._lock:
            pending = self._pending
            for out in outputs:
                p = pending.get(out.request_id)
                if p is None:
                    p = pending[out.request_id] = Pending()
                p.merge(out)

    def wake(self) -> None:
        """Start a round now (thread-safe)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._dirty.set)

    def forget(self, job_id: str) -> None:
        """Drop a job's unsent output (its job was handed to another attempt, which
        regenerates it from what was sent)."""
        with self._lock:
            self._pending.pop(job_id, None)

    def emit(self, out: StepOutput) -> None:
        """Coalesce one output and start a round."""
        self.coalesce([out])
        self.wake()

    # --- the event loop ----------------------------------------------------------------------
    def stop(self) -> None:
        """Send what is pending, then let `run` return."""
        self.stopping = True
        self._dirty.set()

    async def run(self) -> None:
        """Publish rounds until `stop()` (a failed round is retried first, verbatim)."""
        self._loop = asyncio.get_running_loop()
        while True:
            if not self._retry:
                if not self.stopping:
                    await self._dirty.wait()
                    self._dirty.clear()
                with self._lock:
                    taken, self._pending = self._pending, {}
                self._retry = self._build_batch(taken)
                if not self._retry:
                    if self.stopping:
                        return
                    continue
            try:
                results = await self.writer.publish([item for item, _ in self._retry])
            except TRANSIENT_REDIS_ERRORS as exc:
                reraise_if_cancelling()
                log.warning("redis unavailable: publish", extra={"error": str(exc)})
                if self.stopping:
                    return
                await asyncio.sleep(0.2)
                continue
            batch, self._retry = self._retry, []
            now = time.monotonic()
            for (item, pending), result in zip(batch, results, strict=True):
                await self._after_publish(item.event, result, now, pending)

    def _build_batch(self, taken: dict[str, Pending]) -> list[tuple[PendingPublish, Pending]]:
        """One event per job with the next seq number of that job."""
        batch = []
        for jid, p in taken.items():
            job = self.host.active.get(jid)
            if job is None:
                continue
            tokens = max(p.tokens, job.tokens)
            finish = p.finish_reason if p.finish_reason in NORMAL_ENDS else None
            parked = True if p.finish_reason and finish is None else None  # stopped, unfinished
            usage = None
            if finish:
                usage = Usage(prompt_tokens=p.prompt_tokens or job.prompt_tokens,
                              completion_tokens=tokens)
            job.seq += 1
            event = TokenEvent.model_construct(
                job_id=jid, seq=job.seq, attempt=job.attempt, text=p.text, tokens=tokens,
                finish_reason=finish, usage=usage, error=p.error if finish else None,
                prompt=p.prompt, worker_id=self.host.id, parked=parked,
            )
            batch.append((PendingPublish(event, job.spec.reply_channel), p))
        return batch

    def _restore(self, jid: str, old: Pending) -> None:
        """Put output that was not written back in front of anything produced since."""
        with self._lock:
            newer = self._pending.get(jid)
            if newer is not None:
                old.merge(newer)
            self._pending[jid] = old

    async def _after_publish(self, ev: TokenEvent, result: int, now: float, p: Pending) -> None:
        host = self.host
        job = host.active.get(ev.job_id)
        if job is None:
            return
        ctx = {"job_id": ev.job_id, "attempt": ev.attempt, "worker_id": host.id}
        if result == FENCED:
            log.warning("job taken over by another worker: dropping it", extra=ctx)
            host.drop(job)
            await host.finish_local(job, ack=False)
            return
        if result == CANCELLED:  # not written: its seq is free again, its text kept
            job.seq = ev.seq - 1
            host.drop(job)
            self._restore(ev.job_id, p)  # the park event carries it
            return
        host.count_tokens(max(0, ev.tokens - job.tokens))
        job.tokens = ev.tokens
        job.prompt_tokens = p.prompt_tokens or job.prompt_tokens
        if ev.finish_reason or ev.parked:
            await host.finish_local(job, ack=True)
            what = "job finished" if ev.finish_reason else "job parked (resumable)"
            log.info(what, extra={**ctx, "finish_reason": ev.finish_reason, "tokens": ev.tokens})
            return
        if result == 0:  # DUPLICATE (stored by an earlier try) counts as heard
            job.unheard_since = job.unheard_since or now
            if now - job.unheard_since > self.no_subscriber_timeout:
                log.warning("no gateway listens to this job: parking it", extra=ctx)
                host.drop(job)
        else:
            job.unheard_since = None
