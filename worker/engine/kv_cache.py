"""The KV cache's contract, its size, and the choice between its two layouts.

Both layouts are allocated once at start-up for `max_batch` sequences of up to `max_len`
tokens and never grow or move; a budget of `tokens_total` tokens caps what running
sequences may reserve. A sequence reserves its prompt plus what it may still generate when it
is admitted (`reserve`), so a running sequence never runs out of cache and nothing is ever
preempted; a request that does not fit waits in the engine's line.

- `PagedKV` (kv_pool.py): a pool of fixed-size blocks per layer, a block table per
  sequence, reads by gathering blocks. The layout for GPUs (and what the CUDA-graph work
  captures: the pool, the block tables and the step inputs keep their addresses).
- `MappedRowsKV` (kv_rows.py): a row per sequence in virtual memory, reads as plain views;
  the OS commits pages as tokens are written and takes them back when a sequence ends
  (madvise). The CPU layout: a gather costs as much as the attention itself there.

Every layout offers: `reserve(row, tokens)`, `release(row)`, `move_row(src, dst, length)`,
`prepare(batch)` (per-step read/write metadata), `write(layer, k, v, batch)`,
`decode_kv(layer, batch)`, `segment_kv(layer, segment)`, `reset()`, `close()`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("chatstream.worker")

CPU_AUTO_BUDGET = 512 * 1024 * 1024  # bytes: the most --kv-cache-memory 0 takes on CPU


@dataclass(frozen=True)
class KVShape:
    """The keys/values one layer stores per token: [kv_heads, head_dim] each."""

    kv_heads: int
    head_dim: int


def bytes_per_token(shapes: list[KVShape], dtype: torch.dtype) -> int:
    """Bytes of keys and values one token takes across all layers."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(2 * s.kv_heads * s.head_dim * size for s in shapes)


class TokenBudget:
    """Reservations in tokens, per KV row, against a total."""

    def __init__(self, total: int, granule: int):
        self.total = total
        self.granule = granule  # reservations are rounded up to this (a block, a page)
        self.by_row: dict[int, int] = {}
        self.used = 0

    def size(self, tokens: int) -> int:
        return -(-tokens // self.granule) * self.granule

    def fits(self, tokens: int) -> bool:
        return self.used + self.size(tokens) <= self.total

    def take(self, row: int, tokens: int) -> None:
        size = self.size(tokens)
        if row in self.by_row or self.used + size > self.total:
            raise RuntimeError(f"KV budget: cannot reserve {tokens} tokens for row {row}")
        self.by_row[row] = size
        self.used += size

    def give_back(self, row: int) -> None:
        self.used -= self.by_row.pop(row, 0)

    def move(self, src: int, dst: int) -> None:
        self.by_row[dst] = self.by_row.pop(src)

    def clear(self) -> None:
        self.by_row.clear()
        self.used = 0


class Budgeted:
    """What both layouts report about their budget (`self.budget`, a TokenBudget)."""

    budget: TokenBudget

    @property
    def tokens_total(self) -> int:
        return self.budget.total

    @property
    def tokens_used(self) -> int:
        return self.budget.used

    def fits(self, tokens: int) -> bool:
        return self.budget.fits(tokens)


def make_kv_cache(
    layout: str,
    shapes: list[KVShape],
    dtype: torch.dtype,
    device: torch.device,
    max_batch: int,
    max_len: int,
    budget_bytes: int,
):  # noqa: ANN201 - PagedKV | MappedRowsKV
    """The KV cache for `layout` (auto: rows on CPU where the OS allows it, else paged)."""
    from chatstream_cluster.worker.engine.kv_pool import PagedKV
    from chatstream_cluster.worker.engine.kv_rows import MappedRowsKV, rows_supported

    tokens = budget_bytes // bytes_per_token(shapes, dtype)
    if layout == "auto":
        layout = "rows" if device.type == "cpu" and rows_supported() else "paged"
    if layout == "rows":
        try:
            return MappedRowsKV(shapes, dtype, max_batch, max_len, tokens)
        except (OSError, ValueError, OverflowError) as exc:
            log.warning("rows KV layout unavailable, using paged blocks", extra={"error": str(exc)})
    return PagedKV(shapes, dtype, device, max_batch, max_len, tokens)
