"""HFEngine: a transformers model generating for many requests at once (the Engine protocol).

Only the glue lives here; the parts are worker/engine/*:

- `submit` renders and tokenizes in the caller's thread (prompt.py); the engine thread does
  only model work;
- each `step` drains the inbox, lets the scheduler plan the step (scheduler.py: admission by
  KV budget, chunked prefill mixed with decode), runs one forward (runner.py over the KV cache,
  kv_cache.py), samples (sampling.py) and turns tokens into text (detokenizer.py);
- after a failed step `reset` frees everything and names the requests it dropped, so the
  worker hands them to another attempt (worker/loop.py).

Start-up sizes the KV cache once (sizing.py) and refuses, with the reason, a model the engine
cannot compute correctly (model_check.py: a parity self-check against the model's own forward).
A prompt that can never fit (`len(prompt) + 1 > max_context`) ends with a 400
`context_length_exceeded` naming both numbers, before it runs: only the worker has the
tokenizer and chat template to count it. A reply that would run past `max_context` ends there
with finish_reason "length".
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from chatstream_cluster.shared.schemas import JobError
from chatstream_cluster.worker.engine.cuda_graphs import (
    Capture,
    DecodeGraphs,
    cuda_capture,
    length_buckets,
)
from chatstream_cluster.worker.engine.detokenizer import make_detokenizer, split_stop
from chatstream_cluster.worker.engine.faults import FaultPlan
from chatstream_cluster.worker.engine.hf_model import eos_ids, load_model, max_context
from chatstream_cluster.worker.engine.kv_cache import bytes_per_token, make_kv_cache
from chatstream_cluster.worker.engine.model_check import (
    TOLERANCE,
    check_supported,
    probe,
    probe_ids,
    self_check,
)
from chatstream_cluster.worker.engine.prompt import render
from chatstream_cluster.worker.engine.runner import Runner
from chatstream_cluster.worker.engine.sampling import (
    SamplingRows,
    sample,
    seed_key,
    suppress_mask,
)
from chatstream_cluster.worker.engine.scheduler import ChunkBudget, Scheduler, StepPlan
from chatstream_cluster.worker.engine.sequence import Sequence
from chatstream_cluster.worker.engine.sizing import fit_max_len, plan_kv
from chatstream_cluster.worker.engine.step_timer import StepTimer
from chatstream_cluster.worker.engine_api import EngineLoad, GenerationRequest, StepOutput

log = logging.getLogger("chatstream.worker")

# Prompt tokens prefilled per step (with that step's decodes) when --prefill-chunk-tokens is
# 0. On CPU a step's time grows with its tokens, so while streams decode the chunk adapts to
# keep a step within 2.3x a decode-only one (scheduler.ChunkBudget; bench: `python -m bench
# --scenarios stall`), up to 512; on a GPU a big chunk costs little more than a small one.
CHUNK_TOKENS = {"cpu": 512}
CHUNK_TOKENS_DEFAULT = 2048


class HFEngine:
    """The Engine protocol (worker/engine_api.py) over a transformers causal LM."""

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        max_batch: int = 16,
        dtype: str = "auto",
        cache_dir: str | None = None,
        fast_forward: bool = True,
        threads: int = 0,
        kv_cache_memory: int = 0,
        max_model_len: int = 0,
        prefill_chunk_tokens: int = 0,
        gpu_memory_utilization: float = 0.9,
        kv_layout: str = "auto",
        cuda_graphs: str = "off",
        decode_attention: str = "gather",
        graph_capture: Capture | None = None,
    ):
        """`threads`: torch CPU threads for the thread that steps the engine (0 = torch's
        default). torch keeps that setting per thread, so `step()` applies it to its caller.
        `cuda_graphs` "on": decode steps replay CUDA graphs (cuda_graphs.py; CUDA and the
        paged layout only); `graph_capture` replaces the CUDA capture (tests:
        `cuda_graphs.EagerReplay()` runs the same machinery on a CPU). `decode_attention`
        "flex": decode reads the paged pool in place (flex_decode.py).
        Raises `UnsupportedModel` (model_check.py) for a model it cannot serve correctly."""
        self.threads = threads
        self._thread_state = threading.local()  # .ready: `threads` applied in this thread
        self._use_threads()
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.max_batch = max_batch
        self.model_name = model
        self.model, self.tokenizer = load_model(model, self.device, dtype, cache_dir)
        check_supported(self.model)
        model_ctx = max_context(self.model.config, self.tokenizer)
        ids = probe_ids(self.model, model_ctx)
        shapes, reference = probe(self.model, ids)
        kv_dtype = next(self.model.parameters()).dtype
        self.chunk_tokens = prefill_chunk_tokens or CHUNK_TOKENS.get(
            self.device.type, CHUNK_TOKENS_DEFAULT
        )
        plan = plan_kv(
            device=self.device, per_token=bytes_per_token(shapes, kv_dtype),
            model_ctx=model_ctx, max_batch=max_batch, kv_cache_memory=kv_cache_memory,
            max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
            profile=lambda: self._profile(shapes, kv_dtype),
        )
        self.kv = make_kv_cache(kv_layout, shapes, kv_dtype, self.device, max_batch,
                                plan.max_len, plan.budget_bytes)
        # The cache rounds its size down to whole blocks/pages: the longest sequence must fit.
        self.max_context = fit_max_len(plan.max_len, self.kv.tokens_total, max_model_len)
        self.faults = FaultPlan.from_env()
        self.runner = Runner(self.model, self.kv, self.max_context, fast_forward, self.faults,
                             max_step_tokens=self.chunk_tokens + max_batch)
        self.fast_forward = self.runner.fast
        checked = False
        if decode_attention == "flex":
            checked = self._use_flex(ids, reference)
        if not checked:
            self_check(self.runner, self.kv, self.model, ids[: self.max_context],
                       reference[: self.max_context])
        if cuda_graphs == "on":
            self._capture_graphs(graph_capture, kv_dtype)
        self._eos = eos_ids(self.model, self.tokenizer)
        self._suppress = suppress_mask(self.model, self.device)
        adaptive = not prefill_chunk_tokens and self.device.type == "cpu"
        self.chunk = ChunkBudget(self.chunk_tokens, adaptive)
        self.sampling = SamplingRows(max_batch, self.device)
        self.scheduler = Scheduler(self.kv, max_batch, self.max_context, self.chunk,
                                   self.sampling)
        self.timer: StepTimer | None = None  # set by benchmarks: where a step's time goes
        self._lock = threading.Lock()
        self._inbox: list[Sequence] = []
        self._cancels: set[str] = set()
        log.info("engine ready", extra={
            "model": model, "device": str(self.device), "kv_layout": self.kv.layout,
            "kv_tokens": self.kv.tokens_total, "kv_bytes": plan.budget_bytes,
            "max_model_len": self.max_context, "prefill_chunk_tokens": self.chunk_tokens,
            "fast_path": self.fast_forward, "decode": self.decode_path,
            "decode_attention": self.decode_attention,
        })

    # -- the Engine protocol -------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        """Render and tokenize the request (in the caller's thread: slow, keep it off the
        event loop), then queue it for the next step (thread-safe)."""
        seq = self._prepare(request)
        with self._lock:
            self._inbox.append(seq)

    def cancel(self, request_id: str) -> None:
        """Drop a request at the next step with finish_reason "cancelled" (thread-safe)."""
        with self._lock:
            self._cancels.add(request_id)

    def has_work(self) -> bool:
        """True while any request is queued or running."""
        with self._lock:
            inbox = bool(self._inbox or self._cancels)
        return inbox or bool(self.scheduler.waiting or self.scheduler.running)

    @property
    def running(self) -> int:
        """Sequences in the running batch now."""
        return len(self.scheduler.running)

    @property
    def waiting(self) -> int:
        """Requests waiting in the engine for a batch slot or KV cache."""
        with self._lock:
            inbox = sum(1 for s in self._inbox if s.early is None)
        return inbox + len(self.scheduler.waiting)

    def load(self) -> EngineLoad:
        """Requests waiting inside the engine and the KV cache's use, for the heartbeat."""
        return EngineLoad(self.waiting, self.kv.tokens_used, self.kv.tokens_total)

    def step(self) -> list[StepOutput]:
        """Admit, prefill a chunk and decode one token for every running sequence."""
        if not getattr(self._thread_state, "ready", False):
            self._use_threads()
        outputs: list[StepOutput] = []
        timer = self.timer
        if timer is not None:
            timer.start()
        with torch.inference_mode():
            self._drain_inbox(outputs)
            plan = self.scheduler.plan()
            if plan:
                self._run(plan, outputs)
        if timer is not None:
            timer.stop()
        return outputs

    def reset(self) -> list[str]:
        """After a failed step: drop every request (running, waiting, queued) and free the
        whole KV cache; returns their ids so the caller can hand them over (a request that
        was being cancelled stays cancelled: the job's cancel flag lives in Redis)."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
            self._cancels.clear()
        dropped = self.scheduler.reset() + inbox
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return [seq.request_id for seq in dropped]

    def close(self) -> None:
        """Drop the model and the KV cache."""
        self.scheduler.reset()
        self.kv.close()
        self.model = self.runner = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def decode_attention(self) -> str:
        """Which decode attention runs: "flex" (the paged pool in place) or "gather"."""
        return "flex" if self.kv.flex is not None else "gather"

    @property
    def decode_path(self) -> str:
        """How decode steps run: "cuda-graphs" (captured and not turned off) or "eager"."""
        graphs = self.runner.graphs if self.runner is not None else None
        return "cuda-graphs" if graphs is not None and graphs.enabled else "eager"

    def _use_threads(self) -> None:
        self._thread_state.ready = True
        if self.threads:
            torch.set_num_threads(self.threads)

    # -- before the engine thread ---------------------------------------------------------

    def render(self, request: GenerationRequest) -> tuple[list[int], str]:
        """Prompt token ids (resume text appended) and the rendered prompt text."""
        return render(self.tokenizer, request)

    def _prepare(self, request: GenerationRequest) -> Sequence:
        """Render, tokenize and validate; `early` is set when the request ends right away."""
        seq = Sequence(request=request, tokens=request.resume_tokens)
        try:
            seq.prompt_ids, text = self.render(request)
        except Exception as exc:  # noqa: BLE001 - a template that rejects the messages
            seq.early = self._error(seq, "invalid_request", f"cannot render: {exc}")
            return seq
        seq.prompt_text = text if request.return_prompt else None
        n = len(seq.prompt_ids)
        if n == 0:
            seq.early = self._error(seq, "invalid_request", "the prompt is empty")
        elif n + 1 > self.max_context:
            message = f"prompt is {n} tokens but the model's context is {self.max_context} tokens"
            seq.early = self._error(seq, "context_length_exceeded", message)
        elif seq.tokens >= request.sampling.max_tokens:
            seq.early = self._final(seq, "length")
        else:
            seq.key = seed_key(request.sampling.seed)
            seq.detok = make_detokenizer(self.tokenizer, seq.prompt_ids)
        return seq

    def _error(self, seq: Sequence, code: str, message: str) -> StepOutput:
        out = self._final(seq, "error")
        out.error = JobError(code=code, status=400, message=message)
        return out

    # -- the step ------------------------------------------------------------------------

    def _drain_inbox(self, outputs: list[StepOutput]) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
        waiting = self.scheduler.waiting
        for seq in inbox:
            if seq.early is not None:
                outputs.append(seq.early)
            else:
                waiting.append(seq)
        if not cancels:
            return
        for seq in [s for s in waiting if s.request_id in cancels]:
            waiting.remove(seq)
            outputs.append(self._final(seq, "cancelled"))
        for seq in [s for s in self.scheduler.running if s.request_id in cancels]:
            outputs.append(self._final(seq, "cancelled"))
            self.scheduler.release(seq)

    def _run(self, plan: StepPlan, outputs: list[StepOutput]) -> None:
        timer = self.timer
        started = time.perf_counter()
        batch = self.runner.prepare(plan)
        if timer is not None:
            timer.mark()
        logits = self.runner.forward(batch)
        if timer is not None:
            timer.mark()
        self.chunk.record(len(plan.decodes), sum(n for _, n in plan.chunks),
                          time.perf_counter() - started)
        # The forward succeeded: only now does the sequences' state move on.
        sampled = plan.decodes
        for seq in sampled:
            seq.computed += 1
        if plan.chunks:
            sampled = list(sampled)
            for seq, n in plan.chunks:
                seq.computed += n
                if seq.prefilled:
                    sampled.append(seq)
        if not sampled:
            return
        rows, positions = batch.sampled()
        drawn = sample(logits, rows, positions, self.sampling, self._suppress)
        if timer is not None:
            timer.mark()  # before the sync: on CUDA its event then completes with the step
        tokens = drawn.tolist()  # the step's one host sync
        advance = self._advance
        finished = []
        for seq, token in zip(sampled, tokens, strict=True):
            out = advance(seq, token)
            if out is not None:
                outputs.append(out)
                if out.finish_reason:
                    finished.append(seq)
        for seq in finished:
            self.scheduler.release(seq)

    def _advance(self, seq: Sequence, token: int) -> StepOutput | None:
        """Account one sampled token; return the output to send, if any."""
        sampling = seq.request.sampling
        finish = None
        text = ""
        if token in self._eos:
            finish = "stop"
        else:
            seq.tokens += 1
            seq.last_token = token
            text = seq.detok.add_one(token)
            if seq.tokens >= sampling.max_tokens or seq.length >= self.max_context:
                finish = "length"
        if finish is None and not sampling.stop and not seq.pending:
            # The common case, with nothing held back: the new text goes out as it is.
            if not text and seq.sent_first:
                return None
            emit = text
        else:
            pending = seq.pending + text
            if finish is not None:
                pending += seq.detok.flush()
            emit, seq.pending, hit = split_stop(pending, sampling.stop)
            if hit:
                finish = "stop"
            elif finish is not None:
                emit, seq.pending = emit + seq.pending, ""
            if not emit and finish is None and seq.sent_first:
                return None
        out = StepOutput(seq.request.request_id, emit, seq.tokens, len(seq.prompt_ids), finish)
        if not seq.sent_first:
            out.prompt = seq.prompt_text
            seq.sent_first = True
        return out

    def _final(self, seq: Sequence, reason: str) -> StepOutput:
        out = StepOutput(
            request_id=seq.request_id,
            text="",
            tokens=seq.tokens or seq.request.resume_tokens,
            prompt_tokens=len(seq.prompt_ids),
            finish_reason=reason,
        )
        if not seq.sent_first:
            out.prompt = seq.prompt_text
        return out

    # -- start-up ------------------------------------------------------------------------

    def _use_flex(self, ids: list[int], reference: torch.Tensor) -> bool:
        """Decode attention through flex_decode.py, if the self-check passes with it (True);
        else the gather path (logged) and False: the caller self-checks that."""
        from chatstream_cluster.worker.engine.flex_decode import FlexDecode

        if self.kv.layout != "paged":
            log.warning("flex decode attention needs the paged KV layout: using gather",
                        extra={"kv_layout": self.kv.layout})
            return False
        try:
            self.kv.flex = FlexDecode(self.kv, compiled=self.device.type == "cuda")
            self_check(self.runner, self.kv, self.model, ids[: self.max_context],
                       reference[: self.max_context])
            return True
        except Exception as exc:  # noqa: BLE001 - any failure: the verified gather path
            self.kv.flex = None
            log.warning("flex decode attention failed its check: using gather",
                        extra={"error": f"{type(exc).__name__}: {exc}"})
            return False

    def _capture_graphs(self, capture: Capture | None, dtype: torch.dtype) -> None:
        if self.kv.layout != "paged" or (capture is None and self.device.type != "cuda"):
            log.warning("CUDA graphs need a CUDA device and the paged KV layout: decode steps "
                        "run eagerly", extra={"device": str(self.device),
                                              "kv_layout": self.kv.layout})
            return
        lengths = length_buckets(self.max_context, self.kv.block_size)
        if self.kv.flex is not None:  # it reads each sequence's blocks: one length will do
            lengths = lengths[-1:]
        graphs = DecodeGraphs(
            self.runner.eager, self.runner.buffers, self.max_batch, lengths,
            capture or cuda_capture(self.device), TOLERANCE.get(dtype, 0.1), self.runner.path,
        )
        with torch.inference_mode():
            graphs.capture_all()
        self.runner.graphs = graphs

    def _profile(self, shapes, dtype) -> None:  # noqa: ANN001
        """One forward of the largest step (a full prefill chunk plus a decode per batch
        slot) on a throwaway cache, to measure its activation peak (CUDA sizing)."""
        from chatstream_cluster.worker.engine.batch import build_batch
        from chatstream_cluster.worker.engine.kv_pool import BLOCK_SIZE, PagedKV

        chunk = self.chunk_tokens
        per_row = -(-(chunk + 1) // BLOCK_SIZE) * BLOCK_SIZE  # whole blocks per reservation
        scratch = PagedKV(shapes, dtype, self.device, self.max_batch + 1, chunk + 1,
                          (self.max_batch + 1) * per_row)
        runner = Runner(self.model, scratch, chunk + 1, fast=False)
        try:
            for row in range(self.max_batch + 1):
                scratch.reserve(row, chunk + 1)
            decodes = [(row, 0, 0) for row in range(1, self.max_batch + 1)]
            batch = build_batch(decodes, [(0, 0, [0] * chunk)], [True], self.device)
            with torch.inference_mode():
                runner.run_batch(batch)
        finally:
            scratch.close()
