"""Per-request sampling inside a shared batch: temperature, top-k, top-p and seed per row.

`sample()` takes the logits of every running sequence at once ([n, vocab]) and each row's own
`SamplingParams`; a row with a seed draws from its own `torch.Generator`, so its output does
not depend on what else is in the batch. Temperature 0 is greedy (argmax).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from chatstream_cluster.shared.schemas import SamplingParams


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    suppress: torch.Tensor | None = None,
) -> list[int]:
    """One token id per row of `logits` [n, vocab], each row with its own params."""
    logits = logits.float()
    if suppress is not None:
        logits = logits + suppress[: logits.shape[-1]]
    any_greedy = any(p.temperature == 0 for p in params)
    greedy = logits.argmax(-1) if any_greedy else None
    if all(p.temperature == 0 for p in params):
        return greedy.tolist()
    n = len(params)
    temps = [p.temperature or 1.0 for p in params]
    if all(t == temps[0] for t in temps):
        logits = logits / temps[0]
    else:
        logits = logits / torch.tensor(temps, device=logits.device)[:, None]
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
        [float(torch.rand((), generator=g)) if g else random.random() for g in generators],
        device=logits.device,
    )
    # right=True never lands on a zero-probability token.
    choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    choice = choice.clamp_max(cdf.shape[-1] - 1)
    sampled = ids.gather(1, choice[:, None]).squeeze(1) if ids is not None else choice
    out = sampled.tolist()
    if greedy is None:
        return out
    greedy_list = greedy.tolist()
    return [greedy_list[i] if params[i].temperature == 0 else out[i] for i in range(n)]


def suppress_mask(model: Any, device: torch.device) -> torch.Tensor | None:
    """An additive -inf mask from generation_config.suppress_tokens (the demo's printable set)."""
    tokens = getattr(model.generation_config, "suppress_tokens", None)
    if not tokens:
        return None
    vocab = model.get_output_embeddings().weight.shape[0]
    mask = torch.zeros(vocab, device=device)
    mask[torch.tensor([t for t in tokens if t < vocab], device=device)] = float("-inf")
    return mask
