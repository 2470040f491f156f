"""The forwards of HFEngine, both reading and writing the KVStore (worker/kv_cache.py).

- `LlamaFastForward` (worker/llama_forward.py): Llama-shaped models (llama, mistral, qwen2)
  restated with fused projections and few operator calls, reading the HF weights in place.
- `HFForward` (here): any other causal LM through its own forward, the store behind a `Cache`.

Both offer `prefill(prompts, row)` (prompts into KV rows row, row+1..., logits of each one's
last position [m, vocab]) and `decode(tokens, lengths)` (token i at position lengths[i] of row
i, logits [n, vocab]).
"""

from __future__ import annotations

from typing import Any

import torch

from chatstream_cluster.worker.kv_cache import KVStore
from chatstream_cluster.worker.llama_forward import LlamaFastForward, supports_fast_forward


def make_forward(model: Any, store: KVStore, fast: bool = True) -> LlamaFastForward | HFForward:
    """The fast forward where the model supports it (and `fast`), else the HF one."""
    if fast and supports_fast_forward(model):
        return LlamaFastForward(model, store)
    return HFForward(model, store)


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
        self.device = next(model.parameters()).device

    def _additive(self, mask: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(self.dtype).min)

    def prefill(self, prompts: list[list[int]], row: int) -> torch.Tensor:
        """One prompt at a time (the HF forward keeps only the last position's logits)."""
        return torch.cat([self._prefill_one(p, row + j) for j, p in enumerate(prompts)])

    def _prefill_one(self, prompt: list[int], row: int) -> torch.Tensor:
        n = len(prompt)
        self.store.ensure(n + 1)
        self.store.begin_prefill(row, 1, n)
        ids = torch.tensor(prompt, device=self.device)
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()[None, None]
        out = self.model(
            input_ids=ids[None, :],
            attention_mask=self._additive(causal),
            position_ids=torch.arange(n, device=self.device)[None, :],
            use_cache=True,
            **{self.cache_kw: self.cache},
            **self.keep,
        )
        return out.logits[:, -1]

    def decode(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        kv_len = max(lengths) + 1
        self.store.ensure(kv_len)
        lens = torch.tensor(lengths, device=self.device)
        self.store.begin_decode(kv_len, lengths=lens)
        cols = torch.arange(kv_len, device=self.device)
        mask = (cols[None, :] <= lens[:, None])[:, None, None, :]
        out = self.model(
            input_ids=torch.tensor(tokens, device=self.device)[:, None],
            attention_mask=self._additive(mask),
            position_ids=lens[:, None],
            use_cache=True,
            **{self.cache_kw: self.cache},
        )
        return out.logits[:, -1]
