"""HFEngine: a transformers model generating for many requests at once, one token per step.

Our own step loop, not transformers' continuous batching (measured faster on CPU, and it gives
per-request seeds; see bench/engine_bench.py). Each `step()`:

1. drains the inbox (submits and cancels from other threads);
2. runs ONE batched decode step for every running sequence;
3. admits waiting requests (FIFO, up to `max_batch` running) and prefills each alone, which
   also yields its first token.

The KV cache is a `KVStore`: one preallocated tensor per layer with a row per running sequence
(rows 0..n-1, compacted when one leaves), each row right-padded. Llama-shaped models (llama,
mistral, qwen2) run through `LlamaFastForward`, a lean re-statement of their forward that reads
the HF weights (about 1.6x faster per step on CPU); any other model runs its own HF forward
with the same store behind a `Cache` adapter.
"""

from __future__ import annotations

import os
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from shared.schemas import JobError
from worker.detokenizer import ByteTable, Detokenizer, is_byte_level, make_detokenizer, split_stop
from worker.engine_api import GenerationRequest, StepOutput

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
PREFILL_TOKENS_PER_STEP = 8192  # soft budget; at least one request is admitted per step


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
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.max_batch = max_batch
        self.model_name = model
        path = model
        if model == "demo":
            from worker.demo_model import build_demo_model

            path = build_demo_model(cache_dir)
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.path.isdir(path)
        kwargs: dict[str, Any] = {"local_files_only": offline}
        if cache_dir and model != "demo":
            kwargs["cache_dir"] = cache_dir
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_resolve_dtype(dtype, self.device), **kwargs
        ).to(self.device)
        self.model.eval()
        self.max_context = _max_context(self.model.config, self.tokenizer)
        self._eos = _eos_ids(self.model, self.tokenizer)
        self._suppress = _suppress_mask(self.model, self.device)
        self._byte_table = ByteTable(self.tokenizer) if is_byte_level(self.tokenizer) else None
        self._store = KVStore(max_batch, self.max_context)
        use_fast = fast_forward and supports_fast_forward(self.model)
        self._forward = (LlamaFastForward if use_fast else HFForward)(self.model, self._store)
        self.fast_forward = use_fast
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
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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
        n = len(seqs)
        tokens = torch.tensor([s.last_token for s in seqs], device=self.device)
        lengths = [s.length for s in seqs]
        self._store.ensure(max(lengths) + 1)
        logits = self._forward.decode(tokens, torch.tensor(lengths, device=self.device))
        next_ids = self._sample(logits, seqs)
        for i in range(n):
            seqs[i].length += 1
        finished = []
        for seq, token in zip(seqs, next_ids, strict=True):
            out = self._advance(seq, token)
            if out is not None:
                outputs.append(out)
                if out.finish_reason:
                    finished.append(seq)
        for seq in finished:
            self._release(seq)

    def _admit(self, outputs: list[StepOutput]) -> None:
        budget = PREFILL_TOKENS_PER_STEP
        admitted = 0
        while self._waiting and len(self._running) < self.max_batch:
            seq = self._waiting[0]
            if not seq.prompt_ids:
                error = self._prepare(seq)
                if error is not None:
                    self._waiting.popleft()
                    outputs.append(error)
                    continue
            if admitted and len(seq.prompt_ids) > budget:
                break
            self._waiting.popleft()
            budget -= len(seq.prompt_ids)
            admitted += 1
            out = self._prefill(seq)
            if out is not None:
                outputs.append(out)
                if out.finish_reason:
                    self._release(seq)

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

    def _prefill(self, seq: _Seq) -> StepOutput | None:
        seq.row = len(self._running)
        self._running.append(seq)
        self._store.ensure(len(seq.prompt_ids) + 1)
        ids = torch.tensor(seq.prompt_ids, device=self.device)
        logits = self._forward.prefill(ids, seq.row)
        seq.length = len(seq.prompt_ids)
        token = self._sample(logits, [seq])[0]
        return self._advance(seq, token)

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

    # -- sampling ------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        """Per-row temperature/top-k/top-p/seed sampling over float32 logits [n, vocab]."""
        logits = logits.float()
        if self._suppress is not None:
            logits = logits + self._suppress[: logits.shape[-1]]
        params = [s.request.sampling for s in seqs]
        greedy = logits.argmax(-1)
        if all(p.temperature == 0 for p in params):
            return greedy.tolist()
        n = len(seqs)
        temps = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
        logits = logits / temps[:, None]
        ids = None
        if any(p.top_k or p.top_p < 1.0 for p in params):
            logits, ids = logits.sort(dim=-1, descending=True)
            vocab = logits.shape[-1]
            ks = torch.tensor([p.top_k or vocab for p in params], device=logits.device)
            rank = torch.arange(vocab, device=logits.device)
            logits = logits.masked_fill(rank[None, :] >= ks[:, None], float("-inf"))
            probs = torch.softmax(logits, -1)
            top_p = torch.tensor([p.top_p for p in params], device=logits.device)
            drop = (probs.cumsum(-1) - probs) > top_p[:, None]
            logits = logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(logits, -1)
        cdf = probs.cumsum(-1)
        u = torch.tensor(
            [
                float(torch.rand((), generator=s.generator)) if s.generator else random.random()
                for s in seqs
            ],
            device=logits.device,
        )
        # right=True never lands on a zero-probability token.
        choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        choice = choice.clamp_max(cdf.shape[-1] - 1)
        if ids is not None:
            sampled = ids.gather(1, choice[:, None]).squeeze(1)
        else:
            sampled = choice
        out = sampled.tolist()
        greedy_list = greedy.tolist()
        return [greedy_list[i] if params[i].temperature == 0 else out[i] for i in range(n)]


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def _max_context(config: Any, tokenizer: Any) -> int:
    """The model's context length: config first, then the tokenizer, else 2048."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for value in (
        getattr(text_config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ):
        if isinstance(value, int) and 0 < value < 10_000_000:
            return value
    return 2048


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    eos: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, list | tuple):
            eos.update(int(v) for v in value)
    return frozenset(eos)


def _suppress_mask(model: Any, device: torch.device) -> torch.Tensor | None:
    """An additive -inf mask from generation_config.suppress_tokens (the demo's printable set)."""
    tokens = getattr(model.generation_config, "suppress_tokens", None)
    if not tokens:
        return None
    vocab = model.get_output_embeddings().weight.shape[0]
    mask = torch.zeros(vocab, device=device)
    mask[torch.tensor([t for t in tokens if t < vocab], device=device)] = float("-inf")
    return mask


# -- the KV cache and the two forwards ---------------------------------------------------


class KVStore:
    """Per-layer K/V tensors [rows, kv_heads, capacity, head_dim]; row i = running sequence i.

    Rows are right-padded; capacity grows by doubling up to the context length. Layers are
    allocated on first use, so any attention shape works.
    """

    def __init__(self, rows: int, max_len: int):
        self.rows = rows
        self.max_len = max_len
        self.cap = 0
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        self._prefill_row: int | None = None
        self._rows: torch.Tensor | None = None
        self._cols: torch.Tensor | None = None
        self.kv_len = 0
        self.past = 0

    def ensure(self, length: int) -> None:
        """Make room for sequences of `length` tokens."""
        if length > self.cap:
            self.cap = min(max(256, 1 << (length - 1).bit_length()), self.max_len)

    def begin_prefill(self, row: int, length: int) -> None:
        self._prefill_row, self.kv_len, self.past = row, length, 0

    def begin_decode(self, lengths: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Set up a decode step; return its [n, 1, 1, kv_len] boolean attention mask."""
        n = lengths.shape[0]
        self._prefill_row = None
        self._rows = torch.arange(n, device=lengths.device)
        self._cols = lengths
        self.kv_len, self.past = kv_len, kv_len - 1
        cols = torch.arange(kv_len, device=lengths.device)
        return (cols[None, :] <= lengths[:, None])[:, None, None, :]

    def update(
        self, i: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values of layer i; return what attention must read."""
        k, v = self._layer(i, keys)
        if self._prefill_row is not None:
            q = keys.shape[2]
            k[self._prefill_row, :, :q] = keys[0]
            v[self._prefill_row, :, :q] = values[0]
            return keys, values
        k[self._rows, :, self._cols] = keys[:, :, 0]
        v[self._rows, :, self._cols] = values[:, :, 0]
        n = keys.shape[0]
        return k[:n, :, : self.kv_len], v[:n, :, : self.kv_len]

    def move_row(self, src: int, dst: int) -> None:
        for tensors in (self.k, self.v):
            for t in tensors:
                if t is not None:
                    t[dst].copy_(t[src])

    def free(self) -> None:
        self.k, self.v, self.cap = [], [], 0

    def _layer(self, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.k) <= i:
            self.k.append(None)
            self.v.append(None)
        k, v = self.k[i], self.v[i]
        if k is None or k.shape[2] < self.cap:
            shape = (self.rows, like.shape[1], self.cap, like.shape[3])
            nk = torch.zeros(shape, dtype=like.dtype, device=like.device)
            nv = torch.zeros(shape, dtype=like.dtype, device=like.device)
            if k is not None:
                nk[:, :, : k.shape[2]] = k
                nv[:, :, : v.shape[2]] = v
            self.k[i], self.v[i] = k, v = nk, nv
        return k, v


def supports_fast_forward(model: Any) -> bool:
    """Llama-shaped decoder (llama, mistral, qwen2) with full attention."""
    config = model.config
    if config.model_type not in ("llama", "mistral", "qwen2"):
        return False
    window = getattr(config, "sliding_window", None)
    in_use = window and getattr(config, "use_sliding_window", True)
    if in_use and window < _max_context(config, None):
        return False
    base = getattr(model, "model", None)
    layer = base.layers[0] if base is not None and len(base.layers) else None
    needed = ("q_proj", "k_proj", "v_proj", "o_proj")
    return (
        layer is not None
        and all(hasattr(layer.self_attn, name) for name in needed)
        and all(hasattr(layer.mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))
        and not hasattr(layer.self_attn, "q_norm")
    )


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate linears' weights; the modules then view the fused tensor (no extra memory)."""
    weight = torch.cat([lin.weight.data for lin in linears])
    biases = [lin.bias for lin in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                b.data if b is not None else weight.new_zeros(lin.out_features)
                for b, lin in zip(biases, linears, strict=True)
            ]
        )
    start = 0
    for lin in linears:
        end = start + lin.out_features
        lin.weight.data = weight[start:end]
        if lin.bias is not None and bias is not None:
            lin.bias.data = bias[start:end]
        start = end
    return weight, bias


@dataclass
class _FastLayer:
    w_in: torch.Tensor
    eps_in: float
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    w_post: torch.Tensor
    eps_post: float
    wgu: torch.Tensor
    bgu: torch.Tensor | None
    wd: torch.Tensor
    bd: torch.Tensor | None
    act: Any


class LlamaFastForward:
    """The Llama forward pass restated with fused projections and few Python calls."""

    def __init__(self, model: Any, store: KVStore):
        base = model.model
        attn = base.layers[0].self_attn
        config = model.config
        self.store = store
        self.embed = base.embed_tokens.weight
        self.norm, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        self.head = model.lm_head.weight
        self.rotary = base.rotary_emb
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.inter = base.layers[0].mlp.gate_proj.out_features
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            wqkv, bqkv = _fuse([a.q_proj, a.k_proj, a.v_proj])
            wgu, bgu = _fuse([m.gate_proj, m.up_proj])
            self.layers.append(
                _FastLayer(
                    layer.input_layernorm.weight,
                    layer.input_layernorm.variance_epsilon,
                    wqkv,
                    bqkv,
                    a.o_proj.weight,
                    a.o_proj.bias,
                    layer.post_attention_layernorm.weight,
                    layer.post_attention_layernorm.variance_epsilon,
                    wgu,
                    bgu,
                    m.down_proj.weight,
                    m.down_proj.bias,
                    m.act_fn,
                )
            )

    def prefill(self, ids: torch.Tensor, row: int) -> torch.Tensor:
        """Run a whole prompt into KV row `row`; return last-position logits [1, vocab]."""
        n = ids.shape[0]
        self.store.begin_prefill(row, n)
        positions = torch.arange(n, device=ids.device)[None, :]
        return self._run(ids[None, :], positions, None)

    def decode(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Feed one token per running row; return logits [n, vocab]."""
        mask = self.store.begin_decode(lengths, int(lengths.max()) + 1)
        return self._run(tokens[:, None], lengths[:, None], mask)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None):
        n, q = ids.shape
        h = F.embedding(ids, self.embed)
        cos, sin = self.rotary(h, positions)
        cos, sin = cos[:, None], sin[:, None]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        for i, lay in enumerate(self.layers):
            x = _rms_norm(h, lay.w_in, lay.eps_in)
            qkv = F.linear(x, lay.wqkv, lay.bqkv).view(n, q, heads + 2 * kv_heads, dim)
            qs, ks, vs = qkv.transpose(1, 2).split((heads, kv_heads, kv_heads), dim=1)
            qs = qs * cos + _rotate_half(qs) * sin
            ks = ks * cos + _rotate_half(ks) * sin
            ks, vs = self.store.update(i, ks, vs)
            o = F.scaled_dot_product_attention(
                qs,
                ks,
                vs,
                attn_mask=mask,
                is_causal=mask is None and q > 1,
                scale=self.scaling,
                enable_gqa=kv_heads != heads,
            )
            h = h + F.linear(o.transpose(1, 2).reshape(n, q, heads * dim), lay.wo, lay.bo)
            x = _rms_norm(h, lay.w_post, lay.eps_post)
            gate, up = F.linear(x, lay.wgu, lay.bgu).split(self.inter, dim=-1)
            h = h + F.linear(lay.act(gate) * up, lay.wd, lay.bd)
        return F.linear(_rms_norm(h[:, -1], self.norm, self.norm_eps), self.head)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class HFForward:
    """Any causal LM through its own forward, reading and writing the KVStore."""

    def __init__(self, model: Any, store: KVStore):
        import inspect

        from transformers.cache_utils import Cache

        class SlotCache(Cache):
            def __init__(self) -> None:
                self.layers = []

            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                return store.update(layer_idx, key_states, value_states)

            def get_seq_length(self, layer_idx: int = 0) -> int:
                return store.past

        params = inspect.signature(model.forward).parameters
        self.model = model
        self.store = store
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cache = SlotCache()
        self.dtype = next(model.parameters()).dtype

    def _additive(self, mask: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(self.dtype).min)

    def prefill(self, ids: torch.Tensor, row: int) -> torch.Tensor:
        n = ids.shape[0]
        self.store.begin_prefill(row, n)
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()[None, None]
        out = self.model(
            input_ids=ids[None, :],
            attention_mask=self._additive(causal),
            position_ids=torch.arange(n, device=ids.device)[None, :],
            use_cache=True,
            **{self.cache_kw: self.cache},
            **self.keep,
        )
        return out.logits[:, -1]

    def decode(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = self.store.begin_decode(lengths, int(lengths.max()) + 1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self._additive(mask),
            position_ids=lengths[:, None],
            use_cache=True,
            **{self.cache_kw: self.cache},
        )
        return out.logits[:, -1]
