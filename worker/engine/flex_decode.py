"""Decode attention in place over the paged KV pool, with PyTorch's flex_attention
(`--decode-attention flex`).

The step's decode queries go in as one sequence [1, heads, n, dim] and the pool as it lies,
[1, kv_heads, slots, dim] (kv_pool.PagedKV: a slot per token, blocks of 16). A block mask
lists, for each group of 16 queries, the blocks of their sequences up to each one's length
(from the block tables; sequences never share a block, so every block is read once per step,
by the group of the query that owns it), and `mask_mod` keeps, for each query, the slots of
its own sequence before its position and inside its layer's sliding window (from the pool's
`block_owner` / `block_index`). So a decode reads its own sequence's KV, not a window padded
to the batch's longest, and nothing is gathered or copied.

The kernel comes from `torch.compile(flex_attention)` (Triton) on CUDA; elsewhere the
uncompiled flex_attention runs, which materialises scores against the whole pool: a reference
for tests on small pools, not a CPU path. Queries are padded to a multiple of 16 (the padding
queries read the scratch block), so the compiled kernel sees few distinct shapes; the
per-step tensors have fixed shapes too, so a CUDA graph can capture all of it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from chatstream_cluster.worker.engine.batch import ForwardBatch

Q_BLOCK = 16


class FlexDecode:
    """flex_attention for the decode queries of a step over a PagedKV (see the module doc)."""

    def __init__(self, kv: Any, compiled: bool):
        from torch.nn.attention.flex_attention import flex_attention

        if kv.block_size != Q_BLOCK:
            raise ValueError(f"flex decode needs KV blocks of {Q_BLOCK} tokens")
        self.kv = kv
        self.compiled = compiled
        self.attention = torch.compile(flex_attention) if compiled else flex_attention
        # Triton tiles of one query group by one KV block: what the block mask describes.
        self.options = {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": Q_BLOCK,
                        "BLOCK_N": kv.block_size} if compiled else None

    def attend(self, layer: int, q: torch.Tensor, batch: ForwardBatch, scale: float,
               window: int | None, softcap: float | None) -> torch.Tensor:
        """Attention output [n, heads, dim] for the decode queries q [n, heads, dim]."""
        n, heads, dim = q.shape
        padded = -(-n // Q_BLOCK) * Q_BLOCK
        mask = self._block_mask(batch, window, padded)
        pool_k, pool_v = self.kv.k[layer], self.kv.v[layer]
        kv_heads = pool_k.shape[1]
        query = F.pad(q, (0, 0, 0, 0, 0, padded - n)).transpose(0, 1)[None]
        out = self.attention(
            query, pool_k.transpose(0, 1)[None], pool_v.transpose(0, 1)[None],
            score_mod=_softcap(softcap) if softcap is not None else None,
            block_mask=mask, scale=scale, enable_gqa=kv_heads != heads,
            kernel_options=self.options,
        )
        return out[0, :, :n].transpose(0, 1)

    def _block_mask(self, batch: ForwardBatch, window: int | None, padded: int) -> Any:
        """The step's BlockMask for one window (cached on the batch for the other layers)."""
        key = ("flex", window)
        mask = batch.masks.get(key)
        if mask is None:
            mask = batch.masks[key] = self._build(batch, window, padded)
        return mask

    def _build(self, batch: ForwardBatch, window: int | None, padded: int) -> Any:
        from torch.nn.attention.flex_attention import BlockMask

        kv = self.kv
        bs = kv.block_size
        n = batch.n_dec
        extra = padded - n
        # Each query's row and length; padding queries: the scratch row, one token.
        rows = F.pad(batch.dec_rows, (0, extra), value=kv.scratch_row)
        ctx = F.pad(batch.dec_view_ctx, (0, extra), value=1)
        # The blocks each query reads: its table up to its length (and from its window).
        tables = kv.block_tables[rows]  # [padded, max_blocks]
        index = kv.block_positions  # [max_blocks]: 0, 1, 2, ...
        wanted = index[None, :] < (ctx[:, None] + bs - 1) // bs
        if window is not None:
            wanted &= index[None, :] >= (ctx[:, None] - window).clamp_min(0) // bs
        blocks = torch.where(wanted, tables, 0).view(padded // Q_BLOCK, -1)
        # Left-pack each group's blocks, once each (the padding queries share the scratch
        # block); 0, the null block, is no block.
        ranked = blocks.sort(dim=-1, descending=True).values
        repeat = F.pad(ranked[:, 1:] == ranked[:, :-1], (1, 0), value=False)
        ranked = ranked.masked_fill(repeat, 0).sort(dim=-1, descending=True).values
        counts = (ranked > 0).sum(-1, dtype=torch.int32)
        owner, place = kv.block_owner, kv.block_index

        def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
            block = kv_idx // bs
            position = place[block] * bs + kv_idx % bs
            keep = (owner[block] == rows[q_idx]) & (position < ctx[q_idx])
            if window is not None:
                keep = keep & (position >= ctx[q_idx] - window)
            return keep

        return BlockMask.from_kv_blocks(
            counts[None, None], ranked.to(torch.int32)[None, None],
            BLOCK_SIZE=(Q_BLOCK, bs), mask_mod=mask_mod,
            seq_lengths=(padded, kv.k[0].shape[0]), compute_q_blocks=False,
        )


def _softcap(cap: float) -> Any:
    def score_mod(score, b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        return torch.tanh(score / cap) * cap

    return score_mod
