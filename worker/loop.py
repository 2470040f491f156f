"""The worker's lifecycle, top to bottom: intake → engine thread → publisher → finish.

- `run` starts the heartbeat, the control listener, the engine thread and the publisher, then
  takes jobs (`_intake`) only while the batch has free slots.
- `_start_job` fences the job (attempt + 1), replays what an earlier attempt already sent and
  hands the sequence to the engine.
- The engine thread steps all sequences together; outputs are coalesced per job until the
  publisher (worker/publisher.py) sends them, so generation never waits on Redis.
- The publisher sends one fenced event per job per round, pipelined; a fenced job leaves the
  batch, a cancelled or unheard one is parked (resumable).
- SIGTERM (`drain`) stops intake, lets running jobs finish up to the drain timeout, and leaves
  the rest unacknowledged so another worker continues them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from redis.exceptions import ConnectionError as RedisConnectionError

from chatstream_cluster.shared.events import (
    EventWriter,
    replay_state,
)
from chatstream_cluster.shared.job_state import JobStates
from chatstream_cluster.shared.jobqueue import JobEntry, JobQueue
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.models import ModelRegistry, check_served_name
from chatstream_cluster.shared.redis_client import make_pubsub_redis, make_redis
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS, reraise_if_cancelling
from chatstream_cluster.shared.registry import WorkerRegistry
from chatstream_cluster.shared.schemas import (
    ControlMessage,
    JobError,
    WorkerInfo,
)
from chatstream_cluster.shared.sentinel_watch import sentinel_watch
from chatstream_cluster.shared.settings import WorkerSettings
from chatstream_cluster.shared.supervise import Supervisor
from chatstream_cluster.shared.waits import wait_set
from chatstream_cluster.worker.engine_api import (
    Engine,
    EngineLoad,
    GenerationRequest,
    StepOutput,
)
from chatstream_cluster.worker.publisher import ActiveJob, Publisher
from chatstream_cluster.worker.resources import resource_snapshot

log = logging.getLogger("chatstream.worker")
MAX_TAKEOVERS = 4  # a job whose workers keep dying is failed, not retried forever
MAX_STEP_FAILURES = 3  # failed engine steps in a row before the worker gives up and exits


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA) or the CPU allocator's error, without importing torch."""
    text = str(exc)
    return (type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text
            or "can't allocate memory" in text)


@dataclass
class WorkerStats:
    tokens: int = 0
    window: list[tuple[float, int]] = field(default_factory=list)

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        self.window = [(t, n) for t, n in self.window if now - t < 10] + [(now, self.tokens)]
        (t0, n0), (t1, n1) = self.window[0], self.window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


class Worker:
    """One worker process: one engine, one batch, one Redis pool."""

    def __init__(self, settings: WorkerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.keys = Keys(settings.key_prefix)
        suffix = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.id = settings.worker_id or f"{socket.gethostname()}-{suffix}"
        # The served name: this worker takes the jobs of that model's queue only.
        self.model = check_served_name(settings.served_model_name or settings.model)
        self.redis = make_redis(settings.redis_url)
        self.queue = JobQueue(self.redis, self.keys, model=self.model,
                              partitions=settings.queue_partitions)
        self.states = JobStates(self.redis, self.keys)
        self.registry = WorkerRegistry(self.redis, self.keys)
        self.models = ModelRegistry(self.redis, self.keys)
        self.publisher = Publisher(
            EventWriter(self.redis, self.keys, settings.event_stream_ttl), self,
            settings.no_subscriber_timeout,
        )
        self.active: dict[str, ActiveJob] = {}
        self.stats = WorkerStats()
        self.started_ms = int(time.time() * 1000)
        self._engine_wake = threading.Event()
        self._stop_engine = threading.Event()
        self._slot_free = asyncio.Event()
        self._draining = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.engine_failed = False
        self._deferred: dict[str, JobEntry] = {}

    # --- lifecycle -------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve jobs until `drain()`; returns after in-flight work is done or handed over."""
        self._loop = asyncio.get_running_loop()
        await self._retry_forever(self.queue.check_partitions, "check queue partitions")
        await self._retry_forever(self.queue.ensure_group, "create consumer group")
        engine_thread = threading.Thread(target=self._engine_thread, name="engine", daemon=True)
        engine_thread.start()
        supervisor = Supervisor()  # a crashed loop is logged and restarted with backoff
        supervisor.start("heartbeat", self._heartbeat_loop)
        supervisor.start("control", self._control_loop)
        supervisor.start("publish", self.publisher.run)
        watch = sentinel_watch(self.settings.redis_url)  # Sentinel: follow a failover at once
        if watch is not None:
            supervisor.start("sentinel-watch", watch.run)
        log.info("worker ready", extra={"worker_id": self.id, "model": self.model,
                                        "source": self.engine.model_name})
        try:
            await self._intake()
            await self._wait_drained()
        finally:
            self._stopping = True
            self.publisher.stop()  # it sends what is left, then returns
            await asyncio.wait([supervisor.tasks["publish"]], timeout=2)
            await supervisor.stop()
            self._stop_engine.set()
            self._engine_wake.set()
            await asyncio.to_thread(engine_thread.join, 5)
            with contextlib.suppress(*TRANSIENT_REDIS_ERRORS):
                await self.registry.remove(self.id)
            await self.queue.close()
            await self.redis.aclose()
            self.engine.close()
            log.info("worker stopped", extra={"worker_id": self.id})

    def drain(self) -> None:
        """Stop taking jobs; `run` returns once running ones finish or the drain timeout passes."""
        if not self._draining.is_set():
            log.info("draining", extra={"worker_id": self.id, "running": len(self.active)})
            self._draining.set()
            self._slot_free.set()

    async def _wait_drained(self) -> None:
        deadline = time.monotonic() + self.settings.drain_timeout
        while self.active and time.monotonic() < deadline:
            self._slot_free.clear()
            await wait_set(self._slot_free, deadline - time.monotonic())
        if self.active:
            log.warning(
                "drain timeout: leaving jobs to other workers",
                extra={"worker_id": self.id, "jobs": list(self.active)},
            )

    async def _retry_forever(self, func, what: str):  # noqa: ANN001, ANN202
        """Retry `func` while Redis is down; give up once draining (SIGTERM must still work)."""
        delay = 0.1
        while True:
            try:
                return await func()
            except TRANSIENT_REDIS_ERRORS as exc:
                reraise_if_cancelling()
                log.warning(f"redis unavailable: {what}", extra={"error": str(exc)})
                if self._draining.is_set():
                    return None
                await wait_set(self._draining, delay)
                delay = min(delay * 2, 2.0)

    # --- intake ----------------------------------------------------------------------------
    async def _intake(self) -> None:
        last_reclaim = last_prune = 0.0
        while not self._draining.is_set():
            free = self.engine.max_batch - len(self.active)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                entries: list[JobEntry] = []
                takeover = False
                if time.monotonic() - last_reclaim > self.settings.job_claim_idle / 2:
                    last_reclaim = time.monotonic()
                    entries = await self.queue.reclaim(self.id, self.settings.job_claim_idle, free)
                    takeover = bool(entries)
                if not entries and time.monotonic() - last_prune > self._prune_after_s:
                    last_prune = time.monotonic()
                    await self._prune_dead_consumers()
                if not entries:
                    entries = await self.queue.read(self.id, free, block_ms=500)
            except TRANSIENT_REDIS_ERRORS as exc:
                reraise_if_cancelling()
                log.warning("redis unavailable: read jobs", extra={"error": str(exc)})
                await asyncio.sleep(0.5)
                continue
            for entry in entries:
                if self._draining.is_set():
                    break  # unacknowledged: another worker reclaims it
                await self._retry_forever(
                    lambda e=entry, t=takeover: self._start_job(e, takeover=t), "start job"
                )

    @property
    def _prune_after_s(self) -> float:
        """A consumer silent this long whose worker left the registry is dead for sure."""
        return 2 * max(self.settings.worker_ttl, self.settings.job_claim_idle)

    async def _prune_dead_consumers(self) -> None:
        """Drop dead workers' consumers (pending entries already claimed) from the group, so
        it does not grow with every worker start."""
        live = {info.id for info, _age in await self.registry.live()} | {self.id}
        for name in await self.queue.prune_consumers(live, self._prune_after_s):
            log.info("removed a dead worker's consumer", extra={"consumer": name})

    async def _start_job(self, entry: JobEntry, *, takeover: bool = False) -> None:
        spec = entry.spec
        if spec is None:
            log.error(
                "undecodable job: moved to dead letters",
                extra={"entry_id": entry.entry_id, "error": entry.error},
            )
            await self.queue.dead_letter(entry, entry.error)
            return
        if spec.model and spec.model != self.model:  # never routed here by a gateway
            await self.queue.dead_letter(entry, f"job for model {spec.model!r} in the queue of "
                                         f"{self.model!r}")
            return
        if spec.job_id in self.active:
            # A resumed job whose earlier attempt is still leaving this worker: start it after.
            self._deferred[spec.job_id] = entry
            return
        attempt, takeovers, why_not = await self.states.begin_attempt(
            spec.job_id, entry.nonce, self.id, takeover=takeover
        )
        ctx = {"job_id": spec.job_id, "attempt": attempt, "worker_id": self.id}
        if not attempt:  # stale entry, cancelled before it started, finished or expired
            log.info("job entry not run", extra={**ctx, "reason": why_not})
            await self.queue.finish(entry.entry_id)
            return
        seq, text, tokens = (0, "", 0)
        if attempt > 1:
            seq, text, tokens = await replay_state(self.redis, self.keys, spec.job_id)
            log.info("continuing job", extra={**ctx, "from_seq": seq, "from_tokens": tokens})
        job = ActiveJob(entry.entry_id, spec, attempt, seq, tokens)
        self.active[spec.job_id] = job
        if takeovers > MAX_TAKEOVERS:
            self.publisher.emit(StepOutput(
                spec.job_id, tokens=tokens, finish_reason="error", error=JobError(
                    code="too_many_attempts",
                    message=f"the job was taken over from {MAX_TAKEOVERS} failed workers")))
            return
        request = GenerationRequest(
            request_id=spec.job_id,
            messages=spec.messages,
            sampling=spec.sampling,
            resume_text=text,
            resume_tokens=tokens,
            return_prompt=spec.return_prompt and attempt == 1,
        )
        await asyncio.to_thread(self.engine.submit, request)  # renders and tokenizes
        if job.dropping:  # cancelled while it was being rendered: the engine had not seen it
            self.engine.cancel(spec.job_id)
        self._engine_wake.set()
        log.debug("job started", extra=ctx)

    # --- engine thread ---------------------------------------------------------------------
    def _engine_thread(self) -> None:
        """The engine thread; if it dies, the worker drains and exits non-zero (so a
        supervisor restarts it) instead of heartbeating with no engine behind it."""
        try:
            self._engine_main()
        except BaseException:
            log.exception("engine thread died", extra={"worker_id": self.id})
            self.engine_failed = True
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self.drain)

    def _engine_main(self) -> None:
        """Step the engine while it has work; hand each step's outputs to the publisher.

        An output wakes the publisher at once when it is a job's first or last, or when its
        job was last sent `stream_interval` or more ago (so a slow stream's tokens never wait).
        Otherwise it waits, at most `stream_interval`, to go with the next ones: a fast engine
        sends a few tokens per event instead of paying a publish round, the gateway's relay
        and the client's parsing for every token.
        """
        interval = self.settings.stream_interval
        last_sent: dict[str, float] = {}  # job -> when its output last went to the publisher
        held: set[str] = set()  # jobs with output the publisher has not been woken for
        held_since: float | None = None
        failures = 0  # failed steps in a row
        while not self._stop_engine.is_set():
            if not self.engine.has_work():
                if held:
                    self.publisher.wake()
                    held.clear()
                    held_since = None
                self._engine_wake.wait(0.1)
                self._engine_wake.clear()
                continue
            try:
                outputs = self.engine.step()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - a broken step must not kill the worker silently
                failures += 1
                if self._after_failed_step(exc, failures):
                    return
                continue
            if not outputs and held_since is None:
                continue
            self.publisher.coalesce(outputs)
            now = time.monotonic()
            urgent = False
            for out in outputs:
                held.add(out.request_id)
                last = last_sent.get(out.request_id, float("-inf"))
                urgent = urgent or bool(out.finish_reason) or now - last >= interval
            if not urgent and held_since is None:
                held_since = now
            if urgent or now - held_since >= interval:  # type: ignore[operator]
                self.publisher.wake()
                last_sent.update(dict.fromkeys(held, now))
                held.clear()
                held_since = None
            for out in outputs:
                if out.finish_reason:
                    last_sent.pop(out.request_id, None)

    def _after_failed_step(self, exc: Exception, failures: int) -> bool:
        """A step raised: reset the engine and hand its jobs to another attempt (the path a
        worker crash takes: unacknowledged, they are reclaimed and continue from the text
        already sent). Returns True when the failure is fatal: `MAX_STEP_FAILURES` in a row,
        an engine that cannot reset, or an out-of-memory error on a single request."""
        log.error("engine step failed", exc_info=exc,
                  extra={"worker_id": self.id, "failures_in_a_row": failures})
        fatal = failures >= MAX_STEP_FAILURES
        try:
            dropped = self.engine.reset()
        except Exception:  # noqa: BLE001
            log.exception("engine reset failed", extra={"worker_id": self.id})
            dropped, fatal = [], True
        if _is_out_of_memory(exc) and len(dropped) <= 1:
            fatal = True  # even one request does not fit: retrying here cannot help
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._hand_over, dropped, fatal)
        return fatal

    def _hand_over(self, job_ids: list[str], fatal: bool) -> None:
        """Let go of jobs the engine dropped (asyncio thread): no longer touched, their entries
        go idle and a worker reclaims them; fatal: the worker stops taking jobs and exits."""
        if fatal:
            job_ids = list(self.active)
        for jid in job_ids:
            job = self.active.pop(jid, None)
            if job is None:
                continue
            self.publisher.forget(jid)  # unsent text: the next attempt regenerates it
            log.warning("job handed over after an engine failure",
                        extra={"job_id": jid, "attempt": job.attempt, "worker_id": self.id})
        self._slot_free.set()
        if fatal:
            log.error("engine keeps failing: leaving the cluster", extra={"worker_id": self.id})
            self.engine_failed = True
            self.drain()

    # --- the publisher's host (worker/publisher.py's JobHost) ----------------------------------
    def drop(self, job: ActiveJob) -> None:
        """Stop generating `job`: the engine ends it within one step."""
        if not job.dropping:
            job.dropping = True
            self.engine.cancel(job.spec.job_id)
            self._engine_wake.set()

    async def finish_local(self, job: ActiveJob, *, ack: bool) -> None:
        """Forget a job that finished, was parked or was taken over; start one deferred."""
        self.active.pop(job.spec.job_id, None)
        self._slot_free.set()
        # Retried while Redis is down (a failover): a Redis error here must not end the
        # publisher, which runs this, with a round it has not finished.
        if ack:
            await self._retry_forever(lambda: self.queue.finish(job.entry_id), "acknowledge job")
        deferred = self._deferred.pop(job.spec.job_id, None)
        if deferred is not None:
            await self._retry_forever(lambda: self._start_job(deferred), "start job")

    def count_tokens(self, n: int) -> None:
        self.stats.tokens += n

    # --- heartbeat and control -------------------------------------------------------------
    def info(self) -> WorkerInfo:
        """This worker's registry entry."""
        gpus, cpu = resource_snapshot(self.settings.device)
        load = self.engine.load() if hasattr(self.engine, "load") else EngineLoad()
        return WorkerInfo(
            id=self.id, pid=os.getpid(), host=socket.gethostname(), model=self.model,
            device=self.settings.device, max_batch=self.engine.max_batch,
            running=len(self.active), max_context=self.engine.max_context,
            started_ms=self.started_ms, draining=self._draining.is_set(), gpus=gpus, cpu=cpu,
            tokens_per_s=round(self.stats.tokens_per_s(), 1), waiting=load.waiting,
            kv_tokens_used=load.kv_tokens_used, kv_tokens_total=load.kv_tokens_total,
        )

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.registry.heartbeat(self.info(), self.settings.worker_ttl)
                await self.models.seen(self.model)
                await self.queue.touch(self.id, [j.entry_id for j in self.active.values()])
            except TRANSIENT_REDIS_ERRORS as exc:
                reraise_if_cancelling()
                log.warning("redis unavailable: heartbeat", extra={"error": str(exc)})
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def _control_loop(self) -> None:
        while True:
            client = make_pubsub_redis(self.settings.redis_url)
            pubsub = None
            try:
                await client.initialize()  # a cluster client learns its nodes here
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.keys.control_channel)
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg and msg["type"] == "message":
                        self._on_control(msg["data"])
                    conn = pubsub.connection
                    if conn is not None and conn.should_reconnect():  # Sentinel failed over
                        raise RedisConnectionError("the primary moved: subscribing again")
            except TRANSIENT_REDIS_ERRORS as exc:
                reraise_if_cancelling()
                log.warning("redis unavailable: control channel", extra={"error": str(exc)})
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    if pubsub is not None:
                        await pubsub.aclose()
                    await client.aclose()

    def _on_control(self, data: bytes) -> None:
        try:
            msg = ControlMessage.unpack(data)
        except Exception:  # noqa: BLE001
            log.warning("ignored a malformed control message")
            return
        job = self.active.get(msg.job_id)
        if msg.kind == "cancel" and job is not None:
            log.info("cancel", extra={"job_id": msg.job_id, "worker_id": self.id})
            self.drop(job)
