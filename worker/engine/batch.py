"""What one forward runs: the step's tokens, flattened, and where each one reads and writes KV.

A step mixes decodes (one token per sequence) with prefill chunks (several prompt tokens of a
sequence), as vLLM's chunked prefill does. The tokens are laid out flat, decodes first:

    [d0 d1 ... d(n-1) | chunk of sequence A | chunk of sequence B ...]

Every layer's projections and MLP run once over all of them; attention splits them again
(decodes together, each chunk against its own sequence's cache: `attention.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    @property
    def n_dec(self) -> int:
        return len(self.dec_rows_list)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class StepBuffers:
    """Preallocated per-step inputs (token ids, positions, KV rows, sampled indices): each step
    fills them with one copy (from pinned host memory on CUDA), so a step's input tensors keep
    their addresses, as replaying a captured CUDA graph needs."""

    def __init__(self, max_tokens: int, device: torch.device):
        self.max_tokens = max_tokens
        self.device = device
        pinned = device.type == "cuda"
        self.host = torch.zeros(4, max_tokens, dtype=torch.long, pin_memory=pinned)
        self.dev = self.host if device.type == "cpu" else self.host.to(device)

    def load(self, ids: list[int], positions: list[int], rows: list[int],
             sample: list[int]) -> torch.Tensor | None:
        """The four inputs as views [4, T] (sample index: row 3, first m), or None when the
        step is larger than the buffers (the start-up self-check's long chunks)."""
        count = len(ids)
        if count > self.max_tokens or len(sample) > self.max_tokens:
            return None
        self.host[:3, :count] = torch.tensor([ids, positions, rows], dtype=torch.long)
        self.host[3, : len(sample)] = torch.tensor(sample, dtype=torch.long)
        if self.dev is not self.host:
            self.dev[:, :count].copy_(self.host[:, :count], non_blocking=True)
        return self.dev


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
    segments = []
    sample = list(range(len(decodes)))
    for (row, start, chunk), last in zip(chunks, sample_chunks, strict=True):
        segments.append(Segment(len(ids), row, start, len(chunk)))
        ids += chunk
        positions += range(start, start + len(chunk))
        rows += [row] * len(chunk)
        if last:
            sample.append(len(ids) - 1)
    count, m, n = len(ids), len(sample), len(decodes)
    dev = buffers.load(ids, positions, rows, sample) if buffers is not None else None
    if dev is None:
        host = torch.tensor([ids, positions, rows], dtype=torch.long)
        dev = host.to(device) if device.type != "cpu" else host
        sample_index = torch.tensor(sample, dtype=torch.long, device=device)
    else:
        sample_index = dev[3, :m]
    batch = ForwardBatch(
        input_ids=dev[0, :count],
        positions=dev[1, :count],
        token_rows=dev[2, :count],
        sample_index=sample_index,
        dec_rows_list=rows[:n],
        dec_pos_list=positions[:n],
        segments=segments,
    )
    if n:
        batch.dec_rows = dev[2, :n]
        batch.dec_pos = dev[1, :n]
        batch.dec_max_ctx = max(batch.dec_pos_list) + 1
    return batch
