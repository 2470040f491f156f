"""HFEngine: a transformers model generating for many requests at once, one token per step.

Our own step loop, not transformers' continuous batching (measured faster on CPU, and it gives
per-request seeds; see bench/engine_bench.py). Each `step()`:

1. drains the inbox (submits and cancels from other threads);
2. runs ONE batched decode step for every running sequence;
3. admits waiting requests (FIFO, up to `max_batch` running, up to `prefill_budget` padded
   prompt tokens) and prefills them together, which also yields their first tokens.

A prompt longer than the model's context ends with a 400 `context_length_exceeded` error
naming both numbers, before it is prefilled. The check lives here, not in the gateway, because
counting tokens needs the model's tokenizer and chat template, which only the worker has.

The KV cache is a `KVStore` (worker/kv_cache.py) with a row per running sequence, compacted
when one leaves. Llama-shaped models run through `LlamaFastForward`, any other through its own
HF forward (worker/forward.py); sampling is per row (worker/sampling.py); loading and the
model's limits live in worker/hf_model.py.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from chatstream_cluster.shared.schemas import JobError
from chatstream_cluster.worker.detokenizer import (
    ByteTable,
    Detokenizer,
    is_byte_level,
    make_detokenizer,
    split_stop,
)
from chatstream_cluster.worker.engine_api import GenerationRequest, StepOutput
from chatstream_cluster.worker.forward import HFForward, LlamaFastForward, make_forward
from chatstream_cluster.worker.hf_model import eos_ids, load_model, max_context
from chatstream_cluster.worker.kv_cache import KVStore
from chatstream_cluster.worker.sampling import sample, suppress_mask

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# Most prompt tokens (padded: requests x longest) prefilled in one step; at least one request
# is admitted per step. On CPU a prefill is slow compute, so smaller groups let first tokens
# out sooner (16 streams of the demo model: TTFT p50 ~125 ms at 512 vs ~165 ms at 8192, same
# tokens/s); on a GPU a big group costs little more than a small one.
PREFILL_BUDGET = {"cpu": 512}
PREFILL_BUDGET_DEFAULT = 8192


@dataclass
class _Seq:
    """A running (or waiting) request and its generation state."""

    request: GenerationRequest
    prompt_ids: list[int] = field(default_factory=list)
    prompt_text: str | None = None
    row: int = -1
    length: int = 0  # tokens in the KV cache
    last_token: int = -1  # sampled, not yet fed to the model
    tokens: int = 0  # completion tokens so far, resume included
    detok: Detokenizer | None = None
    pending: str = ""  # text held back (stop-string prefix)
    generator: torch.Generator | None = None
    sent_first: bool = False


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
    ):
        """`threads`: torch CPU threads for the thread that steps the engine (0 = torch's
        default). torch keeps that setting per thread, so `step()` applies it to its caller."""
        self.threads = threads
        self._thread_state = threading.local()  # .ready: `threads` applied in this thread
        self._use_threads()
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.max_batch = max_batch
        self.prefill_budget = PREFILL_BUDGET.get(self.device.type, PREFILL_BUDGET_DEFAULT)
        self.model_name = model
        self.model, self.tokenizer = load_model(model, self.device, dtype, cache_dir)
        self.max_context = max_context(self.model.config, self.tokenizer)
        self._eos = eos_ids(self.model, self.tokenizer)
        self._suppress = suppress_mask(self.model, self.device)
        self._byte_table = ByteTable(self.tokenizer) if is_byte_level(self.tokenizer) else None
        self._store = KVStore(max_batch, self.max_context)
        self._forward: LlamaFastForward | HFForward = make_forward(
            self.model, self._store, fast_forward
        )
        self.fast_forward = isinstance(self._forward, LlamaFastForward)
        self._lock = threading.Lock()
        self._inbox: list[GenerationRequest] = []
        self._cancels: set[str] = set()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # index == KV row

    # -- the Engine protocol -------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; it joins the batch at the next step (thread-safe)."""
        with self._lock:
            self._inbox.append(request)

    def cancel(self, request_id: str) -> None:
        """Drop a request at the next step with finish_reason "cancelled" (thread-safe)."""
        with self._lock:
            self._cancels.add(request_id)

    def has_work(self) -> bool:
        """True while any request is queued or running."""
        with self._lock:
            inbox = bool(self._inbox or self._cancels)
        return inbox or bool(self._waiting or self._running)

    @property
    def running(self) -> int:
        """Sequences in the running batch now."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests waiting for a batch slot."""
        return len(self._waiting)

    def step(self) -> list[StepOutput]:
        """One decode step for every running sequence, then admit and prefill waiting ones."""
        if not getattr(self._thread_state, "ready", False):
            self._use_threads()
        outputs: list[StepOutput] = []
        with torch.inference_mode():
            self._drain_inbox(outputs)
            if self._running:
                self._decode(outputs)
            self._admit(outputs)
        return outputs

    def close(self) -> None:
        """Drop the model and the KV cache."""
        self._running.clear()
        self._waiting.clear()
        self._store.free()
        self.model = self._forward = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _use_threads(self) -> None:
        self._thread_state.ready = True
        if self.threads:
            torch.set_num_threads(self.threads)

    # -- rendering -----------------------------------------------------------------------

    def render(self, request: GenerationRequest) -> tuple[list[int], str]:
        """Prompt token ids (resume text appended) and the rendered prompt text."""
        messages = [m.model_dump() for m in request.messages]
        template = None if getattr(self.tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, chat_template=template
        )
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, chat_template=template
        )
        if not isinstance(ids, list):  # a BatchEncoding in transformers 5.x
            ids = ids["input_ids"]
        ids = list(ids)
        if request.resume_text:
            ids += self.tokenizer.encode(request.resume_text, add_special_tokens=False)
        return ids, text

    # -- the step, in order --------------------------------------------------------------

    def _drain_inbox(self, outputs: list[StepOutput]) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
        for request in inbox:
            self._waiting.append(_Seq(request=request))
        if not cancels:
            return
        kept: deque[_Seq] = deque()
        for seq in self._waiting:
            if seq.request.request_id in cancels:
                outputs.append(self._final(seq, "cancelled"))
            else:
                kept.append(seq)
        self._waiting = kept
        for seq in [s for s in self._running if s.request.request_id in cancels]:
            outputs.append(self._final(seq, "cancelled"))
            self._release(seq)

    def _decode(self, outputs: list[StepOutput]) -> None:
        seqs = self._running
        logits = self._forward.decode([s.last_token for s in seqs], [s.length for s in seqs])
        tokens = self._sample(logits, seqs)
        for seq in seqs:
            seq.length += 1
        self._advance_all(seqs, tokens, outputs)

    def _advance_all(self, seqs: list[_Seq], tokens: list[int], outputs: list[StepOutput]) -> None:
        """Account one sampled token per sequence; release the ones that finished."""
        finished = []
        for seq, token in zip(seqs, tokens, strict=True):
            out = self._advance(seq, token)
            if out is not None:
                outputs.append(out)
                if out.finish_reason:
                    finished.append(seq)
        for seq in finished:
            self._release(seq)

    def _admit(self, outputs: list[StepOutput]) -> None:
        """Move waiting requests into the batch (FIFO) and prefill them together."""
        group: list[_Seq] = []
        longest = 0
        while self._waiting and len(self._running) + len(group) < self.max_batch:
            seq = self._waiting[0]
            if not seq.prompt_ids:
                error = self._prepare(seq)
                if error is not None:
                    self._waiting.popleft()
                    outputs.append(error)
                    continue
            padded = (len(group) + 1) * max(longest, len(seq.prompt_ids))
            if group and padded > self.prefill_budget:
                break
            group.append(self._waiting.popleft())
            longest = max(longest, len(seq.prompt_ids))
        if group:
            self._prefill(group, outputs)

    def _prepare(self, seq: _Seq) -> StepOutput | None:
        """Render and validate; an output here is the request's (error or final) last."""
        request = seq.request
        try:
            seq.prompt_ids, text = self.render(request)
        except Exception as exc:  # a template that rejects the messages
            error = JobError(code="invalid_request", status=400, message=f"cannot render: {exc}")
            return StepOutput(request_id=request.request_id, finish_reason="error", error=error)
        seq.prompt_text = text if request.return_prompt else None
        seq.tokens = request.resume_tokens
        n = len(seq.prompt_ids)
        if n == 0:
            error = JobError(code="invalid_request", status=400, message="the prompt is empty")
            return StepOutput(request_id=request.request_id, finish_reason="error", error=error)
        if n + 1 > self.max_context:
            message = f"prompt is {n} tokens but the model's context is {self.max_context} tokens"
            error = JobError(code="context_length_exceeded", status=400, message=message)
            return StepOutput(
                request_id=request.request_id,
                prompt_tokens=n,
                tokens=seq.tokens,
                finish_reason="error",
                error=error,
                prompt=seq.prompt_text,
            )
        if seq.tokens >= request.sampling.max_tokens:
            return self._final(seq, "length")
        if request.sampling.seed is not None:
            seq.generator = torch.Generator().manual_seed(request.sampling.seed)
        seq.detok = make_detokenizer(self.tokenizer, seq.prompt_ids, self._byte_table)
        return None

    def _prefill(self, group: list[_Seq], outputs: list[StepOutput]) -> None:
        row = len(self._running)
        for i, seq in enumerate(group):
            seq.row = row + i
            seq.length = len(seq.prompt_ids)
            self._running.append(seq)
        logits = self._forward.prefill([s.prompt_ids for s in group], row)
        self._advance_all(group, self._sample(logits, group), outputs)

    def _advance(self, seq: _Seq, token: int) -> StepOutput | None:
        """Account one sampled token; return the output to send, if any."""
        sampling = seq.request.sampling
        finish = None
        text = ""
        if token in self._eos:
            finish = "stop"
        else:
            seq.tokens += 1
            seq.last_token = token
            text = seq.detok.add((token,))
            if seq.tokens >= sampling.max_tokens or seq.length + 1 >= self.max_context:
                finish = "length"
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
        out = StepOutput(
            request_id=seq.request.request_id,
            text=emit,
            tokens=seq.tokens,
            prompt_tokens=len(seq.prompt_ids),
            finish_reason=finish,
        )
        if not seq.sent_first:
            out.prompt = seq.prompt_text
            seq.sent_first = True
        return out

    def _final(self, seq: _Seq, reason: str) -> StepOutput:
        out = StepOutput(
            request_id=seq.request.request_id,
            text="",
            tokens=seq.tokens or seq.request.resume_tokens,
            prompt_tokens=len(seq.prompt_ids),
            finish_reason=reason,
        )
        if not seq.sent_first:
            out.prompt = seq.prompt_text
        return out

    def _release(self, seq: _Seq) -> None:
        """Remove a running sequence, moving the last row into its place."""
        row = seq.row
        last = self._running.pop()
        if last is not seq:
            self._store.move_row(last.row, row)
            last.row = row
            self._running[row] = last
        seq.row = -1

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        params = [s.request.sampling for s in seqs]
        return sample(logits, params, [s.generator for s in seqs], self._suppress)
