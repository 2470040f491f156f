"""What one forward runs: the step's tokens, flattened, and where each one reads and writes KV.

A step mixes decodes (one token per sequence) with prefill chunks (several prompt tokens of a
sequence), as vLLM's chunked prefill does. The tokens are laid out flat, decodes first:

    [d0 d1 ... d(n-1) | chunk of sequence A | chunk of sequence B ...]

Every layer's projections and MLP run once over all of them; attention splits them again
(decodes together, each chunk against its own sequence's cache: `attention.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Segment:
    """A prefill chunk: `n` prompt tokens of the sequence in KV row `row`, from position
    `start`, at `offset` in the flat token list."""

    offset: int
    row: int
    start: int
    n: int

    @property
    def ctx(self) -> int:
        """Tokens the chunk's last query attends to (the cache after this step)."""
        return self.start + self.n


@dataclass
class ForwardBatch:
    """The inputs of one forward and the metadata every layer's attention reads.

    `dec_rows[i]` is the KV row of decode token i and `dec_pos[i]` its position (its keys go
    there); it attends to positions 0..dec_pos[i]. `sample_index` picks the tokens whose
    logits are sampled: every decode, and the last token of a chunk that ends its prompt.
    """

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    sample_index: torch.Tensor  # [m]
    dec_rows_list: list[int]
    dec_pos_list: list[int]
    segments: list[Segment]
    dec_rows: torch.Tensor | None = None  # [n] long
    dec_pos: torch.Tensor | None = None  # [n] long
    token_rows: torch.Tensor | None = None  # [T] long: the KV row of every token
    # Filled by the KV cache's prepare(): how decode attention reads this step.
    dec_view_ctx: torch.Tensor | None = None  # [R] tokens each viewed row attends to
    dec_scatter: torch.Tensor | None = None  # decode i -> viewed row, when not 0..n-1
    dec_max_ctx: int = 0
    slot_mapping: torch.Tensor | None = None  # paged layout: the slot of each token
    dec_blocks: torch.Tensor | None = None  # paged layout: [n, blocks] of decode rows
    masks: dict = field(default_factory=dict)  # per-step cache of attention masks
    graph: tuple[int, int] | None = None  # (batch, KV length) bucket of a CUDA-graph replay

    def sampled(self) -> tuple[torch.Tensor | slice, torch.Tensor]:
        """KV rows [m] and positions [m] of the tokens whose logits are sampled. The rows are
        a slice when they are 0..m-1 (a decode-only step of every running sequence)."""
        if self.segments:
            index = self.sample_index
            return self.token_rows[index], self.positions[index]
        rows = self.dec_rows_list
        if rows and rows[0] == 0 and rows[-1] == len(rows) - 1:  # ascending: exactly 0..m-1
            return slice(0, len(rows)), self.positions
        return self.token_rows, self.positions

    @property
    def n_dec(self) -> int:
        return len(self.dec_rows_list)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class StepBuffers:
    """Preallocated per-step inputs (token ids, positions, KV rows, sampled indices): each step
    fills them with one copy (from pinned host memory on CUDA), so a step's input tensors keep
    their addresses, as replaying a captured CUDA graph needs.

    `pad_to` (CUDA graphs, cuda_graphs.py) fills the columns past the step's tokens with a
    padding token: id 0 at position 0 in `pad_row` (the KV cache's scratch row).

    The pinned host buffer is reused: before it is written, the previous step's copy out of it
    must have run. A step that samples ends with a sync (its `.tolist()`), but a prefill step
    that samples nothing does not, so the copy records an event and the next fill waits on it
    when it has not completed yet (then only: a completed event costs no sync)."""

    def __init__(self, max_tokens: int, device: torch.device, pad_row: int = 0):
        self.max_tokens = max_tokens
        self.device = device
        self.pad_row = pad_row
        pinned = device.type == "cuda"
        self.host = torch.zeros(4, max_tokens, dtype=torch.long, pin_memory=pinned)
        self._fill = self.host.numpy()  # writes from Python lists, without a tensor per list
        self.dev = self.host if device.type == "cpu" else self.host.to(device)
        self.copied: Any = torch.cuda.Event() if pinned else None  # the last copy out of host
        self.arange = torch.arange(max_tokens, device=device)  # the sample index of decodes
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}

    def views(self, count: int) -> tuple[torch.Tensor, ...]:
        """(ids, positions, rows, 0..count-1) of the first `count` tokens: views made once
        per count (the buffers never move)."""
        views = self._views.get(count)
        if views is None:
            dev = self.dev
            views = self._views[count] = (dev[0, :count], dev[1, :count], dev[2, :count],
                                          self.arange[:count])
        return views

    def load(self, ids: list[int], positions: list[int], rows: list[int],
             sample: list[int] | None, pad_to: int = 0) -> bool:
        """Copy the step's inputs in (sample index: row 3, when not every token is sampled);
        False when the step is larger than the buffers (the start-up self-check's long
        chunks)."""
        count = len(ids)
        width = max(count, pad_to)
        if width > self.max_tokens:
            return False
        copied = self.copied
        if copied is not None and not copied.query():
            copied.synchronize()  # the previous copy still reads the host buffer
        fill = self._fill
        fill[0, :count] = ids
        fill[1, :count] = positions
        fill[2, :count] = rows
        if sample is not None:
            fill[3, : len(sample)] = sample
        if width > count:
            fill[:2, count:width] = 0
            fill[2, count:width] = self.pad_row
        if self.dev is not self.host:
            self.dev[:, :width].copy_(self.host[:, :width], non_blocking=True)
            if copied is not None:
                copied.record(torch.cuda.current_stream(self.device))
        return True


def build_batch(
    decodes: list[tuple[int, int, int]],
    chunks: list[tuple[int, int, list[int]]],
    sample_chunks: list[bool],
    device: torch.device,
    buffers: StepBuffers | None = None,
) -> ForwardBatch:
    """`decodes`: (row, position, token) per decoding sequence; `chunks`: (row, start, ids)
    per prefill chunk; `sample_chunks[j]`: chunk j ends its prompt (its last logits count)."""
    ids = [token for _, _, token in decodes]
    positions = [pos for _, pos, _ in decodes]
    rows = [row for row, _, _ in decodes]
    return batch_from_lists(ids, positions, rows, chunks, sample_chunks, device, buffers)


def batch_from_lists(
    ids: list[int],
    positions: list[int],
    rows: list[int],
    chunks: list[tuple[int, int, list[int]]],
    sample_chunks: list[bool],
    device: torch.device,
    buffers: StepBuffers | None = None,
    pad_to: int = 0,
) -> ForwardBatch:
    """`build_batch` from the decodes' token ids, positions and rows as lists (the engine's
    step builds these directly); `pad_to`: see StepBuffers. The lists are extended in place."""
    n = len(ids)
    segments = []
    sample: list[int] | None = None  # None: every token is sampled (a decode-only step)
    if chunks:
        sample = list(range(n))
        for (row, start, chunk), last in zip(chunks, sample_chunks, strict=True):
            segments.append(Segment(len(ids), row, start, len(chunk)))
            ids += chunk
            positions += range(start, start + len(chunk))
            rows += [row] * len(chunk)
            if last:
                sample.append(len(ids) - 1)
    count = len(ids)
    if buffers is not None and buffers.load(ids, positions, rows, sample, pad_to):
        input_ids, pos, token_rows, every = buffers.views(count)
        sample_index = every if sample is None else buffers.dev[3, : len(sample)]
    else:
        host = torch.tensor([ids, positions, rows], dtype=torch.long)
        input_ids, pos, token_rows = host.to(device) if device.type != "cpu" else host
        sample_index = torch.tensor(sample if sample is not None else range(count),
                                    dtype=torch.long, device=device)
    batch = ForwardBatch(input_ids, pos, sample_index, rows[:n] if chunks else rows,
                         positions[:n] if chunks else positions, segments,
                         token_rows=token_rows)
    if n:
        batch.dec_rows = token_rows[:n] if chunks else token_rows
        batch.dec_pos = pos[:n] if chunks else pos
        batch.dec_max_ctx = max(batch.dec_pos_list) + 1
    return batch
