"""Per-request sampling of a whole batch on the device, with one host sync per step.

Each running sequence's sampling parameters (temperature, top-k, top-p and a 64-bit key from
its seed) live in `SamplingRows`, device tensors indexed by KV row, written when a sequence is
admitted (and moved with it), never rebuilt per step. `sample()` gathers them by the sampled
tokens' rows and draws every row at once: greedy rows take the argmax, the others an
inverse-CDF draw from the temperature-scaled distribution, cut to top-k and top-p.

The draw's uniform number is counter-based: splitmix64 of (the sequence's key, the position
of the token being drawn), computed with integer tensor ops on the device. So a seeded
request's text depends only on its seed and prompt, never on what else is in the batch or on
the order of rows, and the draw has no host-side state (it could run inside a CUDA graph).
A request without a seed gets a random key when it is submitted.

Top-k and top-p cut by a threshold: the probabilities are sorted (values only), the k-th
largest and the smallest one whose preceding mass is within top-p give the bar, and every
token at or above it stays, in vocabulary order. The sort runs only while some running
sequence asks for top-k or top-p (the table counts them as sequences come and go).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from chatstream_cluster.shared.schemas import SamplingParams

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 that holds it (tensor arithmetic wraps around)."""
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def splitmix64(value: int) -> int:
    """splitmix64's finalizer on a Python int (the reference for the tensor version)."""
    z = value & MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def seed_key(seed: int | None) -> int:
    """The int64 key a sequence draws with: from its seed (modulo 2**64), or random when it
    has none."""
    value = random.getrandbits(64) if seed is None else seed
    return _signed(splitmix64(value & MASK64))


def uniform_reference(key: int, position: int) -> float:
    """The 24-bit uniform `draw_uniform` scales, for the token at `position` (fed + 1) of a
    sequence with `key`, in plain Python."""
    z = splitmix64((key + position * GOLDEN) & MASK64)
    return (z >> 40) / float(1 << 24)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on signed integers)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


NO_TOP_P = 2.0  # a row without top-p: above any sum of probabilities, so nothing is cut
# Uniforms are scaled by this, so u x total stays below the total after float rounding and
# the inverse-CDF search always lands on a token of probability > 0.
BELOW_ONE = 1.0 - 2.0**-22


def draw_uniform(keys: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1) per row for the token after position `fed`: splitmix64 of key +
    (fed + 1) x golden, its top 24 bits, scaled by BELOW_ONE."""
    if keys.device.type == "cpu":
        return _draw_numpy(keys, fed)
    return _draw_torch(keys, fed)


def _draw_torch(keys: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
    """int64 tensor ops (wrapping like uint64), for the device."""
    z = keys + (fed + 1) * _signed(GOLDEN)
    z = (z ^ _shift_right(z, 30)) * _signed(MIX1)
    z = (z ^ _shift_right(z, 27)) * _signed(MIX2)
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 40).float() * (BELOW_ONE * 2.0**-24)


def _draw_numpy(keys: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
    """The same arithmetic in numpy's uint64, whose small-array ops cost a fraction of torch's
    on a CPU (a dozen of them per step)."""
    position = fed.numpy().view(np.uint64) + np.uint64(1)
    z = keys.numpy().view(np.uint64) + position * np.uint64(GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    z = z ^ (z >> np.uint64(31))
    scale = np.float32(BELOW_ONE * 2.0**-24)
    return torch.from_numpy((z >> np.uint64(40)).astype(np.float32) * scale)


class SamplingRows:
    """Sampling parameters per KV row, on the device (see the module docstring).

    `admit`, `release` and `move` follow the scheduler's rows; the counts say which parts of
    `sample()` this batch needs (argmax only, the sort for top-k/top-p)."""

    def __init__(self, rows: int, device: torch.device):
        self.device = device
        self.temperature = torch.ones(rows, device=device)  # 1 for greedy rows (unused)
        self.greedy = torch.zeros(rows, dtype=torch.bool, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)  # 0: no cut
        self.top_p = torch.full((rows,), NO_TOP_P, device=device)
        self.key = torch.zeros(rows, dtype=torch.long, device=device)
        self._kind: dict[int, tuple[bool, bool, bool]] = {}  # row -> greedy, top-k, top-p
        self.greedy_rows = 0
        self.top_k_rows = 0
        self.top_p_rows = 0

    def admit(self, row: int, params: SamplingParams, key: int) -> None:
        greedy = params.temperature == 0
        self.temperature[row] = params.temperature if not greedy else 1.0
        self.greedy[row] = greedy
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p if params.top_p < 1.0 else NO_TOP_P
        self.key[row] = key
        self._count(row, (greedy, not greedy and params.top_k > 0,
                          not greedy and params.top_p < 1.0))

    def release(self, row: int) -> None:
        self._count(row, None)

    def move(self, src: int, dst: int) -> None:
        for table in (self.temperature, self.greedy, self.top_k, self.top_p, self.key):
            table[dst] = table[src]
        kind = self._kind.get(src)
        self._count(src, None)
        self._count(dst, kind)

    def reset(self) -> None:
        for row in list(self._kind):
            self._count(row, None)

    def _count(self, row: int, kind: tuple[bool, bool, bool] | None) -> None:
        old = self._kind.pop(row, None)
        if old is not None:
            self.greedy_rows -= old[0]
            self.top_k_rows -= old[1]
            self.top_p_rows -= old[2]
        if kind is not None:
            self._kind[row] = kind
            self.greedy_rows += kind[0]
            self.top_k_rows += kind[1]
            self.top_p_rows += kind[2]

    @property
    def all_greedy(self) -> bool:
        return self.greedy_rows == len(self._kind)


def sample(
    logits: torch.Tensor,
    rows: torch.Tensor | slice,
    fed: torch.Tensor,
    table: SamplingRows,
    suppress: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token ids [m] (on the device) for logits [m, vocab] of the sequences in KV `rows` (a
    slice when they are 0..m-1), whose last fed tokens sit at positions `fed`."""
    logits = logits.float()
    if suppress is not None:
        logits = logits + suppress[: logits.shape[-1]]
    greedy = logits.argmax(-1) if table.greedy_rows else None
    if table.all_greedy:
        return greedy
    probs = torch.softmax(logits / table.temperature[rows, None], -1)
    if table.top_k_rows or table.top_p_rows:
        probs = _cut(probs, table.top_k[rows] if table.top_k_rows else None,
                     table.top_p[rows] if table.top_p_rows else None)
    cdf = probs.cumsum(-1)
    target = draw_uniform(table.key[rows], fed)[:, None] * cdf[:, -1:]
    sampled = torch.searchsorted(cdf, target, right=True)[:, 0]
    if greedy is not None:
        sampled = torch.where(table.greedy[rows], greedy, sampled)
    return sampled


def _cut(probs: torch.Tensor, top_k: torch.Tensor | None,
         top_p: torch.Tensor | None) -> torch.Tensor:
    """Zero every probability below the row's top-k / top-p bar (0 / 1: no cut)."""
    vocab = probs.shape[-1]
    if probs.device.type == "cpu":  # numpy's sort of the values alone: ~10x torch's on a CPU
        ranked = torch.from_numpy(np.sort(probs.neg().numpy(), axis=-1)).neg_()
    else:
        ranked = probs.sort(dim=-1, descending=True).values
    bar = None
    if top_p is not None:
        before = ranked.cumsum(-1) - ranked  # the mass ranked above each token: ascending
        kept = torch.searchsorted(before, top_p[:, None], right=True)  # >= 1: before[0] = 0
        bar = ranked.gather(1, kept.clamp_max(vocab) - 1)
    if top_k is not None:
        bar_k = ranked.gather(1, (top_k.clamp_max(vocab) - 1).remainder(vocab)[:, None])
        bar = bar_k if bar is None else torch.maximum(bar, bar_k)
    return probs * (probs >= bar)


def suppress_mask(model: Any, device: torch.device) -> torch.Tensor | None:
    """An additive -inf mask from generation_config.suppress_tokens (the demo's printable set)."""
    tokens = getattr(model.generation_config, "suppress_tokens", None)
    if not tokens:
        return None
    vocab = model.get_output_embeddings().weight.shape[0]
    mask = torch.zeros(vocab, device=device)
    mask[torch.tensor([t for t in tokens if t < vocab], device=device)] = float("-inf")
    return mask
