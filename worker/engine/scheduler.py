"""What runs each step: admission by KV budget, chunked prefill mixed with decode.

Every step, in order:

1. each running sequence whose prompt is in the cache decodes one token;
2. sequences still prefilling get the next chunk of their prompt, oldest first, up to
   `chunk_tokens` prompt tokens in the step;
3. while that budget lasts, waiting requests are admitted (FIFO) if a batch slot is free and
   the KV cache can reserve their prompt plus what they may still generate; the head of the
   line waits until it fits (no one overtakes it), so a long request is not starved.

A long prompt is thus prefilled over several steps, each also decoding every running stream,
so running streams keep a steady pace while it is prefilled (vLLM's chunked prefill).
Running sequences occupy KV rows 0..n-1; when one leaves, the last row moves into its place.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from chatstream_cluster.worker.engine.sequence import Sequence


@dataclass
class StepPlan:
    """One step's work: decoding sequences and (sequence, prompt tokens) prefill chunks."""

    decodes: list[Sequence] = field(default_factory=list)
    chunks: list[tuple[Sequence, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.chunks)


class Scheduler:
    """The waiting line and the running batch of one engine."""

    def __init__(self, kv, max_batch: int, max_len: int, chunk_tokens: int):  # noqa: ANN001
        self.kv = kv
        self.max_batch = max_batch
        self.max_len = max_len
        self.chunk_tokens = chunk_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index == KV row

    def plan(self) -> StepPlan:
        """Decide this step (admitting what fits); the caller runs it, then `advance`s."""
        plan = StepPlan()
        budget = self.chunk_tokens
        for seq in self.running:
            if seq.prefilled:
                plan.decodes.append(seq)
            elif budget > 0:
                n = min(len(seq.prompt_ids) - seq.computed, budget)
                plan.chunks.append((seq, n))
                budget -= n
        while budget > 0 and self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            need = self.reservation(seq)
            if not self.kv.fits(need):
                break
            self.waiting.popleft()
            seq.row = len(self.running)
            seq.reserved = need
            self.kv.reserve(seq.row, need)
            self.running.append(seq)
            n = min(len(seq.prompt_ids), budget)
            plan.chunks.append((seq, n))
            budget -= n
        return plan

    def reservation(self, seq: Sequence) -> int:
        """KV tokens a sequence needs: its prompt plus the tokens it may still generate
        (the last sampled token is never fed back), at most the longest sequence allowed."""
        remaining = seq.request.sampling.max_tokens - seq.request.resume_tokens
        return min(len(seq.prompt_ids) + max(remaining, 0), self.max_len)

    def release(self, seq: Sequence) -> None:
        """Remove a running sequence; the last row moves into its place."""
        row = seq.row
        last = self.running.pop()
        self.kv.release(row)
        if last is not seq:
            self.kv.move_row(last.row, row, last.computed)
            last.row = row
            self.running[row] = last
        seq.row = -1

    def reset(self) -> list[Sequence]:
        """Forget every sequence and free the whole cache; returns what was running or waiting."""
        dropped = [*self.running, *self.waiting]
        self.running.clear()
        self.waiting.clear()
        self.kv.reset()
        for seq in dropped:
            seq.row = -1
        return dropped
