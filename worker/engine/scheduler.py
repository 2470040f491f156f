"""What runs each step: admission by KV budget, chunked prefill mixed with decode.

Every step, in order:

1. each running sequence whose prompt is in the cache decodes one token;
2. sequences still prefilling get the next chunk of their prompt, oldest first, up to the
   step's prompt-token budget (`ChunkBudget`: `--prefill-chunk-tokens`, or on CPU as many as
   keep the step within 2.3x a decode-only step);
3. while that budget lasts, waiting requests are admitted (FIFO) if a batch slot is free and
   the KV cache can reserve their prompt plus what they may still generate; the head of the
   line waits until it fits (no one overtakes it), so a long request is not starved.

A long prompt is thus prefilled over several steps, each also decoding every running stream,
so running streams keep a steady pace while it is prefilled (vLLM's chunked prefill).
Running sequences occupy KV rows 0..n-1; when one leaves, the last row moves into its place
(in the KV cache and in the per-row sampling table, sampling.SamplingRows).
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


class ChunkBudget:
    """Prompt tokens per step: fixed, or (`adaptive`) steered so that a step that also decodes
    takes about `ratio` x a decode-only step, from the step times measured as the engine runs.

    The adaptive rule is for CPUs, where a step's time grows with its tokens: there a fixed
    chunk either stalls the running streams (too big) or slows the long prompt (too small: each
    step also pays the decodes and its own overhead). A feedback loop needs no cost model:
    after each mixed step the chunk is scaled by target / measured time (at most x2 or /2 a
    step). While nothing decodes, a prompt gets `tokens` per step; prompts of up to `SHORT`
    tokens are not held to the steered chunk.
    """

    FLOOR = 16  # never fewer prompt tokens per step than this
    FIRST = 16  # the first chunk next to running decodes (it grows x2 a step to the target)
    SMOOTH = 0.3  # weight of the newest decode-only step time
    SHORT = 128  # adaptive: a prompt of at most this many tokens goes whole

    def __init__(self, tokens: int, adaptive: bool = False, ratio: float = 2.3):
        self.max = tokens
        self.adaptive = adaptive
        # Only long prompts are held to the steered chunk (vLLM, too, lets short prefills
        # through next to long ones): a chat turn's prompt costs its streams one step.
        self.short = self.SHORT if adaptive else tokens
        self.ratio = ratio
        self.decode_s: float | None = None  # a decode-only step (EMA)
        self.mixed = float(min(tokens, self.FIRST))  # the chunk next to decodes

    def tokens(self, decoding: int) -> int:
        if not self.adaptive or not decoding:
            return self.max
        return int(self.mixed)

    def record(self, decodes: int, prompt_tokens: int, seconds: float) -> None:
        """A step ran `decodes` decodes and `prompt_tokens` prompt tokens in `seconds`."""
        if not self.adaptive or not decodes:
            return
        if not prompt_tokens:
            old = self.decode_s
            self.decode_s = seconds if old is None else old + self.SMOOTH * (seconds - old)
        elif self.decode_s is not None and prompt_tokens == int(self.mixed):
            scale = min(2.0, max(0.5, self.ratio * self.decode_s / max(seconds, 1e-9)))
            self.mixed = min(float(self.max), max(float(self.FLOOR), self.mixed * scale))


class Scheduler:
    """The waiting line and the running batch of one engine."""

    def __init__(self, kv, max_batch: int, max_len: int, chunk: ChunkBudget,  # noqa: ANN001
                 sampling=None):  # noqa: ANN001 - sampling.SamplingRows
        self.kv = kv
        self.sampling = sampling
        self.max_batch = max_batch
        self.max_len = max_len
        self.chunk = chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index == KV row

    def plan(self) -> StepPlan:
        """Decide this step (admitting what fits); the caller runs it, then `advance`s."""
        running = self.running
        plan = StepPlan([seq for seq in running if seq.computed >= len(seq.prompt_ids)])
        budget = self.chunk.max  # prompt tokens this step
        long_budget = self.chunk.tokens(len(plan.decodes))  # of which for long prompts
        if len(plan.decodes) < len(running):
            for seq in running:
                if not seq.prefilled and budget > 0:
                    n = self._chunk(seq, budget, long_budget)
                    if n:
                        plan.chunks.append((seq, n))
                        budget -= n
                        long_budget -= n if self._is_long(seq) else 0
        while budget > 0 and self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            need = self.reservation(seq)
            if not self.kv.fits(need):
                break
            self.waiting.popleft()
            seq.row = len(self.running)
            seq.reserved = need
            self.kv.reserve(seq.row, need)
            if self.sampling is not None:
                self.sampling.admit(seq.row, seq.request.sampling, seq.key)
            self.running.append(seq)
            n = self._chunk(seq, budget, long_budget)
            if n:
                plan.chunks.append((seq, n))
                budget -= n
                long_budget -= n if self._is_long(seq) else 0
        return plan

    def _is_long(self, seq: Sequence) -> bool:
        """A long prompt stays long to its last chunk (which would otherwise go whole)."""
        return len(seq.prompt_ids) > self.chunk.short

    def _chunk(self, seq: Sequence, budget: int, long_budget: int) -> int:
        """Prompt tokens of `seq` this step: a short prompt's rest within the step's budget,
        a long one's within what long prompts may take next to running decodes."""
        remaining = len(seq.prompt_ids) - seq.computed
        allowed = min(budget, long_budget) if self._is_long(seq) else budget
        return max(0, min(remaining, allowed))

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
        if self.sampling is not None:
            self.sampling.release(row)
        if last is not seq:
            self.kv.move_row(last.row, row, last.computed)
            if self.sampling is not None:
                self.sampling.move(last.row, row)
            last.row = row
            self.running[row] = last
        seq.row = -1

    def reset(self) -> list[Sequence]:
        """Forget every sequence and free the whole cache; returns what was running or waiting."""
        dropped = [*self.running, *self.waiting]
        self.running.clear()
        self.waiting.clear()
        self.kv.reset()
        if self.sampling is not None:
            self.sampling.reset()
        for seq in dropped:
            seq.row = -1
        return dropped
