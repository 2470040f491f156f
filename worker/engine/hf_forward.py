"""HFForward: any causal LM through its own transformers code, over the engine's KV cache.

The model keeps its modules and math; two seams of transformers 5.x connect it to the engine:

- a `Cache` whose `update()` writes the step's keys and values into the engine's KV cache;
- an attention function registered with `AttentionInterface` as "chatstream" and set as the
  model's attention implementation. transformers builds no mask for an implementation it does
  not know (its mask functions return None), and every attention module passes its own
  `sliding_window` and `softcap` to the function, so each layer gets the right mask from
  worker/engine/attention.py whatever its type (full, sliding).

A step's tokens go in as one row [1, T] with their positions (decodes and prefill chunks
flattened, worker/engine/batch.py); `logits_to_keep` keeps only the sampled positions.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from chatstream_cluster.worker.engine.attention import attend
from chatstream_cluster.worker.engine.batch import ForwardBatch

ATTENTION_NAME = "chatstream"
_step = threading.local()  # .ctx: the _StepContext of the forward running in this thread


@dataclass
class _StepContext:
    kv: Any
    batch: ForwardBatch
    written: set[int] = field(default_factory=set)
    attended: dict[int, tuple[int | None, float | None]] = field(default_factory=dict)


def _current() -> _StepContext:
    ctx = getattr(_step, "ctx", None)
    if ctx is None:
        raise RuntimeError("the chatstream attention ran outside an engine step")
    return ctx


def chatstream_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [1, heads, T, dim] in, output
    [1, T, heads, dim] out; keys and values come from the KV cache, not the arguments."""
    ctx = _current()
    layer = module.layer_idx
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q = query[0].transpose(0, 1)
    out = attend(ctx.kv, layer, q, ctx.batch, scale, sliding_window, softcap)
    ctx.attended[layer] = (sliding_window, softcap)
    return out[None], None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, chatstream_attention)


def _cache_class() -> type:
    from transformers.cache_utils import Cache

    class EngineCache(Cache):
        """Writes each layer's new keys/values [1, kv_heads, T, dim] into the KV cache."""

        def __init__(self) -> None:  # no per-layer state: the KV cache holds it all
            self.layers = []

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # noqa: ANN001, ANN202
            ctx = _current()
            ctx.kv.write(layer_idx, key_states[0].transpose(0, 1),
                         value_states[0].transpose(0, 1), ctx.batch)
            ctx.written.add(layer_idx)
            return key_states, value_states

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 0

    return EngineCache


class HFForward:
    """`forward(batch, kv)` through the model's own forward; logits of the sampled tokens."""

    def __init__(self, model: Any):
        _register()
        params = inspect.signature(model.forward).parameters
        self.model = model
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep = "logits_to_keep" in params
        self.cache = _cache_class()()
        model.set_attn_implementation(ATTENTION_NAME)
        self.last: _StepContext | None = None  # the last step's context (start-up checks)

    def forward(self, batch: ForwardBatch, kv: Any) -> torch.Tensor:
        ctx = _StepContext(kv, batch)
        _step.ctx = ctx
        try:
            extra = {"logits_to_keep": batch.sample_index} if self.keep else {}
            out = self.model(
                input_ids=batch.input_ids[None],
                position_ids=batch.positions[None],
                use_cache=True,
                **{self.cache_kw: self.cache},
                **extra,
            )
        finally:
            _step.ctx = None
        self.last = ctx
        logits = out.logits[0]
        return logits if self.keep else logits[batch.sample_index]
