"""PagedKV: the KV cache as a pool of blocks, sized once at start, never grown or moved.

Layer i keeps keys and values as two tensors [num_blocks * block_size, kv_heads, head_dim]
(a token slot per row; `.view(num_blocks, block_size, ...)` is the block view that paged
attention kernels take). Block 0 is a zero "null" block: unused block-table entries point
there, so padded reads see zeros that the mask hides. A sequence gets all the blocks of its
reservation when it is admitted, so its block table never changes while it runs.

`block_tables` [max_batch + 1, max_blocks] is one preallocated device tensor, a row per
running sequence, written only when a sequence is admitted or moved; per step, `prepare()`
turns (row, position) of every token into its slot with tensor ops on the device. Its last row
(`scratch_row`) points every entry at one scratch block that no sequence owns: the padding rows
of a CUDA-graph replay (cuda_graphs.py) write their keys and values there. `block_owner` and
`block_index` [num_blocks] say which row holds each block and at which place in its table
(-1: free), for attention that reads the pool in place (flex_decode.py).

Decode attention reads either by gathering the blocks of the step's rows up to its longest
sequence (then SDPA on them; cheap on a GPU) or, with `--decode-attention flex`, in place
through flex_attention over each sequence's own blocks (flex_decode.py).
"""

from __future__ import annotations

from typing import Any

import torch

from chatstream_cluster.worker.engine.batch import ForwardBatch, Segment
from chatstream_cluster.worker.engine.kv_cache import Budgeted, KVShape, TokenBudget

BLOCK_SIZE = 16


class PagedKV(Budgeted):
    """See the module docstring."""

    layout = "paged"
    flex: Any = None  # a flex_decode.FlexDecode when decode attention reads the pool in place

    def __init__(
        self, shapes: list[KVShape], dtype: torch.dtype, device: torch.device, max_batch: int,
        max_len: int, tokens: int, block_size: int = BLOCK_SIZE,
    ):
        self.dtype, self.device, self.shapes = dtype, device, shapes
        self.max_batch, self.max_len, self.block_size = max_batch, max_len, block_size
        self.max_blocks = -(-max_len // block_size)
        usable = max(0, tokens // block_size)
        self.num_blocks = usable + 2  # + the null block (0) and the scratch block (last)
        self.budget = TokenBudget(usable * block_size, block_size)
        slots = self.num_blocks * block_size
        self.k = [torch.zeros(slots, s.kv_heads, s.head_dim, dtype=dtype, device=device)
                  for s in shapes]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.scratch_row, self.scratch_block = max_batch, self.num_blocks - 1
        self.block_tables = torch.zeros(max_batch + 1, self.max_blocks, dtype=torch.long,
                                        device=device)
        self.block_tables[self.scratch_row] = self.scratch_block
        self.block_owner = torch.full((self.num_blocks,), -1, dtype=torch.long, device=device)
        self.block_owner[self.scratch_block] = self.scratch_row
        self.block_index = torch.zeros(self.num_blocks, dtype=torch.long, device=device)
        self.block_positions = torch.arange(self.max_blocks, device=device)
        self._free = list(range(usable, 0, -1))  # pop() hands out low ids first
        self._blocks: dict[int, list[int]] = {}

    # -- budget and rows --------------------------------------------------------------

    def reserve(self, row: int, tokens: int) -> None:
        self.budget.take(row, tokens)
        count = self.budget.by_row[row] // self.block_size
        blocks = [self._free.pop() for _ in range(count)]
        self._blocks[row] = blocks
        table = torch.zeros(self.max_blocks, dtype=torch.long)
        table[:count] = torch.tensor(blocks, dtype=torch.long)
        self.block_tables[row].copy_(table, non_blocking=True)
        held = self.block_tables[row, :count]
        self.block_owner.index_fill_(0, held, row)
        self.block_index.index_copy_(0, held, self.block_positions[:count])

    def release(self, row: int) -> None:
        blocks = self._blocks.pop(row, [])
        self.block_owner.index_fill_(0, self.block_tables[row, : len(blocks)], -1)
        self._free.extend(reversed(blocks))
        self.budget.give_back(row)
        self.block_tables[row].zero_()

    def move_row(self, src: int, dst: int, length: int) -> None:
        """The sequence of row `src` now lives in row `dst` (its blocks stay where they are)."""
        self._blocks[dst] = self._blocks.pop(src)
        self.budget.move(src, dst)
        self.block_tables[dst].copy_(self.block_tables[src])
        self.block_tables[src].zero_()
        self.block_owner.index_fill_(0, self.block_tables[dst, : len(self._blocks[dst])], dst)

    def reset(self) -> None:
        for row in list(self._blocks):
            self.release(row)

    def close(self) -> None:
        self.k, self.v = [], []
        self._blocks.clear()
        self.budget.clear()

    # -- one step ---------------------------------------------------------------------

    def prepare(self, batch: ForwardBatch) -> None:
        bs = self.block_size
        pos = batch.positions
        blocks = self.block_tables[batch.token_rows, pos // bs]
        batch.slot_mapping = blocks * bs + pos % bs
        if batch.n_dec:
            count = -(-batch.dec_max_ctx // bs)
            batch.dec_blocks = self.block_tables[batch.dec_rows, :count]
            batch.dec_view_ctx = batch.dec_pos + 1

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None:
        """Store this step's keys and values [T, kv_heads, dim] of `layer` in their slots."""
        self.k[layer].index_copy_(0, batch.slot_mapping, k)
        self.v[layer].index_copy_(0, batch.slot_mapping, v)

    def _gather(self, cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
        """[rows, kv_heads, length, dim] of the given blocks [rows, count]."""
        rows, count = blocks.shape
        shape = cache.shape[1:]
        view = cache.view(self.num_blocks, self.block_size, *shape)
        picked = view.index_select(0, blocks.reshape(-1))
        picked = picked.view(rows, count * self.block_size, *shape)[:, :length]
        return picked.transpose(1, 2)

    def decode_kv(self, layer: int, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        length = batch.dec_max_ctx
        return (self._gather(self.k[layer], batch.dec_blocks, length),
                self._gather(self.v[layer], batch.dec_blocks, length))

    def segment_kv(self, layer: int, seg: Segment) -> tuple[torch.Tensor, torch.Tensor]:
        count = -(-seg.ctx // self.block_size)
        blocks = self.block_tables[seg.row : seg.row + 1, :count]
        return (self._gather(self.k[layer], blocks, seg.ctx)[0],
                self._gather(self.v[layer], blocks, seg.ctx)[0])
