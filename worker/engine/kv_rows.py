"""MappedRowsKV: the CPU KV layout. A row per running sequence, in virtual memory.

Layer i keeps keys and values as two tensors [max_batch, kv_heads, cap, head_dim] over an
anonymous private mapping (`mmap`, no huge pages): the OS commits a page when a token is first
written there and `release()` hands a row's pages back (MADV_DONTNEED), so the memory in use
follows the tokens actually cached, never `max_batch x max_len`. Reads are plain views
(`k[:n, :, :length]`), which is what keeps CPU decode as fast as before: gathering blocks
costs as much as the attention itself there (measured: 2-2.5x the attention time at 16
sequences). Reservations are rounded up to a page of one head's row, so what the budget
admits is what the pages can take.

Rows are kept dense by the scheduler: when a sequence leaves, the last row moves into its
place (`move_row` copies the cached tokens, then releases the old row).
"""

from __future__ import annotations

import math
import mmap
import sys

import torch

from chatstream_cluster.worker.engine.batch import ForwardBatch, Segment
from chatstream_cluster.worker.engine.kv_cache import Budgeted, KVShape, TokenBudget

PAGE = mmap.PAGESIZE


def rows_supported() -> bool:
    """True where anonymous mappings can hand pages back (Linux)."""
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED")


class MappedRowsKV(Budgeted):
    """See the module docstring."""

    layout = "rows"
    flex = None  # decode attention reads views of the rows (flex_decode.py is paged only)

    def __init__(
        self, shapes: list[KVShape], dtype: torch.dtype, max_batch: int, max_len: int,
        tokens: int,
    ):
        size = torch.empty((), dtype=dtype).element_size()
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.max_batch = max_batch
        self.shapes = shapes
        # A row of one head spans whole pages, so releasing a row never touches another.
        step = max(PAGE // math.gcd(PAGE, s.head_dim * size) for s in shapes)
        self.cap = -(-max_len // step) * step
        self.max_len = max_len
        granule = max(1, max(PAGE // (s.head_dim * size) for s in shapes))
        total = min(tokens, max_batch * self.cap) // granule * granule
        self.budget = TokenBudget(total, granule)
        self._maps: list[mmap.mmap] = []
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for s in shapes:
            for store in (self.k, self.v):
                store.append(self._mapped((max_batch, s.kv_heads, self.cap, s.head_dim)))
        self._row_bytes = [s.kv_heads * self.cap * s.head_dim * size for s in shapes]

    def _mapped(self, shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        nbytes = numel * torch.empty((), dtype=self.dtype).element_size()
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        mm = mmap.mmap(-1, nbytes, flags=flags)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # a 2 MiB page per touched row would defeat it
            mm.madvise(mmap.MADV_NOHUGEPAGE)
        self._maps.append(mm)
        return torch.frombuffer(mm, dtype=self.dtype, count=numel).view(shape)

    # -- budget and rows --------------------------------------------------------------

    def reserve(self, row: int, tokens: int) -> None:
        self.budget.take(row, tokens)

    def release(self, row: int) -> None:
        self.budget.give_back(row)
        self._discard(row)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Move row `src` (its first `length` tokens) into the free row `dst`."""
        for store in (self.k, self.v):
            for cache in store:
                cache[dst, :, :length].copy_(cache[src, :, :length])
        self.budget.move(src, dst)
        self._discard(src)

    def _discard(self, row: int) -> None:
        for i, nbytes in enumerate(self._row_bytes):
            for mm in self._maps[2 * i : 2 * i + 2]:
                mm.madvise(mmap.MADV_DONTNEED, row * nbytes, nbytes)

    def reset(self) -> None:
        for row in list(self.budget.by_row):
            self._discard(row)
        self.budget.clear()

    def close(self) -> None:
        self.k, self.v = [], []
        self.budget.clear()
        maps, self._maps = self._maps, []
        for mm in maps:
            try:
                mm.close()
            except BufferError:  # a tensor still views it: the mapping goes with the tensor
                pass

    # -- one step ---------------------------------------------------------------------

    def prepare(self, batch: ForwardBatch) -> None:
        """Decode reads view rows 0..R-1; rows that do not decode this step get a dummy query."""
        n = batch.n_dec
        if not n:
            return
        rows = batch.dec_rows_list
        if rows == list(range(n)):
            batch.dec_view_ctx = batch.dec_pos + 1
            return
        count = max(rows) + 1
        ctx = torch.ones(count, dtype=torch.long)
        ctx[batch.dec_rows] = batch.dec_pos + 1
        batch.dec_view_ctx = ctx
        batch.dec_scatter = batch.dec_rows

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None:
        """Store this step's keys and values [T, kv_heads, dim] of `layer`."""
        kc, vc = self.k[layer], self.v[layer]
        n = batch.n_dec
        if n == 1:
            row, pos = batch.dec_rows_list[0], batch.dec_pos_list[0]
            kc[row, :, pos] = k[0]
            vc[row, :, pos] = v[0]
        elif n:
            kc[batch.dec_rows, :, batch.dec_pos] = k[:n]
            vc[batch.dec_rows, :, batch.dec_pos] = v[:n]
        for seg in batch.segments:
            end = seg.offset + seg.n
            kc[seg.row, :, seg.start : seg.ctx] = k[seg.offset : end].transpose(0, 1)
            vc[seg.row, :, seg.start : seg.ctx] = v[seg.offset : end].transpose(0, 1)

    def decode_kv(self, layer: int, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        rows = int(batch.dec_view_ctx.shape[0])
        length = batch.dec_max_ctx
        return self.k[layer][:rows, :, :length], self.v[layer][:rows, :, :length]

    def segment_kv(self, layer: int, seg: Segment) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][seg.row, :, : seg.ctx], self.v[layer][seg.row, :, : seg.ctx]
