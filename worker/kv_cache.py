"""The KV cache of HFEngine: one preallocated tensor per layer, a row per running sequence.

Layer i's cache is one tensor [2, rows, kv_heads, capacity, head_dim]: index 0 holds keys,
index 1 values. Row r belongs to running sequence r (the engine keeps rows 0..n-1 filled and
moves the last row into a freed one). Rows are right-padded: a sequence of length L uses
columns 0..L-1; anything past that is stale and masked out. Capacity grows by doubling up to
the context length; layers are allocated on first use, so any attention shape works.

Two ways in: `write_*`/`read` for LlamaFastForward (keys and values travel together, one copy
per layer and step), and `update()` for HFForward (transformers' `Cache.update` contract).
"""

from __future__ import annotations

import torch


class KVStore:
    """Per-layer K/V tensors, one row per running sequence (see the module docstring)."""

    def __init__(self, rows: int, max_len: int):
        self.rows = rows
        self.max_len = max_len
        self.cap = 0
        self.kv: list[torch.Tensor | None] = []
        # Set by begin_prefill / begin_decode for the forward that follows.
        self._prefill_rows: tuple[int, int] | None = None
        self._rows: torch.Tensor | None = None
        self._cols: torch.Tensor | None = None
        self._col: int | None = None  # the column when one row decodes (basic indexing)
        self.kv_len = 0
        self.past = 0

    def ensure(self, length: int) -> None:
        """Make room for sequences of `length` tokens."""
        if length > self.cap:
            self.cap = min(max(256, 1 << (length - 1).bit_length()), self.max_len)

    def begin_prefill(self, row: int, count: int, length: int) -> None:
        """The next forward writes prompts of up to `length` tokens into rows row..row+count-1."""
        self._prefill_rows = (row, row + count)
        self.kv_len, self.past = length, 0

    def begin_decode(
        self, kv_len: int, lengths: torch.Tensor | None = None, col: int | None = None
    ) -> None:
        """The next forward feeds row i its token at column lengths[i] (rows 0..n-1), or, for
        one row, at column `col` (written by basic indexing, cheaper)."""
        self._prefill_rows = None
        self._col = col
        self._cols = lengths
        if lengths is not None:
            self._rows = torch.arange(lengths.shape[0], device=lengths.device)
        self.kv_len, self.past = kv_len, kv_len - 1

    # -- LlamaFastForward: keys and values together --------------------------------------

    def write_prefill(self, i: int, kv: torch.Tensor) -> None:
        """Store layer i's prompt keys/values, kv [count, length, 2, kv_heads, head_dim]."""
        assert self._prefill_rows is not None
        cache = self._layer(i, kv.shape[3], kv.shape[4], kv)
        start, end = self._prefill_rows
        cache[:, start:end, :, : kv.shape[1]] = kv.permute(2, 0, 3, 1, 4)

    def write_decode(self, i: int, kv: torch.Tensor) -> None:
        """Store layer i's new keys/values, kv [n, 2, kv_heads, head_dim], one per row."""
        cache = self._layer(i, kv.shape[2], kv.shape[3], kv)
        if self._col is not None:
            cache[:, 0, :, self._col] = kv[0]
        else:
            cache[:, self._rows, :, self._cols] = kv

    def read(self, i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values [n, kv_heads, kv_len, head_dim] (views) for rows 0..n-1."""
        cache = self.kv[i]
        assert cache is not None
        return cache[0, :n, :, : self.kv_len], cache[1, :n, :, : self.kv_len]

    # -- HFForward: transformers' Cache.update ------------------------------------------

    def update(
        self, i: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values [n, kv_heads, q, head_dim] of layer i; return what
        attention must read."""
        cache = self._layer(i, keys.shape[1], keys.shape[3], keys)
        if self._prefill_rows is not None:
            start, end = self._prefill_rows
            q = keys.shape[2]
            cache[0, start:end, :, :q] = keys
            cache[1, start:end, :, :q] = values
            return keys, values
        if self._col is not None:
            cache[0, 0, :, self._col] = keys[0, :, 0]
            cache[1, 0, :, self._col] = values[0, :, 0]
        else:
            cache[0, self._rows, :, self._cols] = keys[:, :, 0]
            cache[1, self._rows, :, self._cols] = values[:, :, 0]
        return self.read(i, keys.shape[0])

    # -- rows and memory ---------------------------------------------------------------

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (the engine compacts rows when a sequence leaves)."""
        for cache in self.kv:
            if cache is not None:
                cache[:, dst].copy_(cache[:, src])

    def free(self) -> None:
        self.kv, self.cap = [], 0

    def _layer(self, i: int, heads: int, dim: int, like: torch.Tensor) -> torch.Tensor:
        while len(self.kv) <= i:
            self.kv.append(None)
        cache = self.kv[i]
        if cache is None or cache.shape[3] < self.cap:
            shape = (2, self.rows, heads, self.cap, dim)
            grown = torch.zeros(shape, dtype=like.dtype, device=like.device)
            if cache is not None:
                grown[:, :, :, : cache.shape[3]] = cache
            self.kv[i] = cache = grown
        return cache
