"""Decode steps replayed as CUDA graphs (`--cuda-graphs on`), the way vLLM and nano-vllm do it.

At start-up, after the self-check, one graph is captured per (batch-size bucket, KV-length
bucket): batch sizes 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, ... up to `--max-batch`, KV
lengths 256, 512, 1024, ... up to `--max-model-len` (one length when decode attention reads
each sequence's blocks in place, `--decode-attention flex`). Largest first, all in one memory
pool. A graph records one whole forward, the KV cache's per-step metadata included, over
tensors that never move: the step buffers (batch.StepBuffers), the KV pool and block tables
(kv_pool.PagedKV), the model's weights.

A decode-only step of n sequences whose longest context is c replays the graph of the smallest
buckets (b >= n, L >= c): the step buffers are padded to b rows with a padding token in the
KV cache's scratch row, whose keys and values go to a scratch block that no sequence reads;
attention reads L tokens per row, masked to each row's own length. Steps with prefill chunks,
and batches past the largest bucket, run eagerly.

Both forwards are captured (the fast path and the model's own code), so any architecture
that captures benefits. A model whose capture fails, or whose first replay of any bucket does
not give the eager forward's logits (within the start-up self-check's tolerance), runs every
step eagerly from then on; the log says which path each model uses and why.

`EagerReplay` stands in for the GPU in tests: "capture" runs the step once and a replay runs
it again on the same static batch, so bucketing, padding, the scratch row, the replay check
and the fallback run on a CPU exactly as they would around real graphs.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from chatstream_cluster.worker.engine.batch import ForwardBatch, StepBuffers

log = logging.getLogger("chatstream.worker")

BATCH_HEAD = (1, 2, 4, 8, 16, 24, 32, 48, 64)
FIRST_LENGTH = 256

Replay = Callable[[], torch.Tensor]
Capture = Callable[[Callable[[], torch.Tensor]], Replay]


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, then x1.5 and x4/3 in turn (96, 128, 192, 256, ...),
    below `max_batch`, then `max_batch` itself."""
    sizes = [b for b in BATCH_HEAD if b < max_batch]
    size = BATCH_HEAD[-1]
    while True:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
        if size >= max_batch:
            break
        sizes.append(size)
    return [*sizes, max_batch]


def length_buckets(max_len: int, block_size: int) -> list[int]:
    """KV lengths 256, 512, 1024, ... below `max_len`, then `max_len` (whole blocks)."""
    top = -(-max_len // block_size) * block_size
    lengths = []
    length = FIRST_LENGTH
    while length < top:
        lengths.append(length)
        length *= 2
    return [*lengths, top]


def smallest_at_least(buckets: list[int], n: int) -> int | None:
    """The smallest bucket >= n, or None past the largest."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def cuda_capture(device: torch.device) -> Capture:
    """Capture on a CUDA device: a warm-up run on a side stream (lazy initialisation, cuBLAS
    workspaces, compiled kernels), then the capture; every graph shares the first's pool."""
    stream = torch.cuda.Stream(device)
    pool: list[Any] = []

    def capture(step: Callable[[], torch.Tensor]) -> Replay:
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool[0] if pool else None):
            out = step()
        if not pool:
            pool.append(graph.pool())

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    return capture


class EagerReplay:
    """The stand-in for CUDA graphs on a CPU (see the module docstring)."""

    def __init__(self) -> None:
        self.captured = 0
        self.replays = 0

    def __call__(self, step: Callable[[], torch.Tensor]) -> Replay:
        step()
        self.captured += 1

        def replay() -> torch.Tensor:
            self.replays += 1
            return step()

        return replay


class DecodeGraphs:
    """The captured graphs of one engine and the choice, per step, of graph or eager."""

    def __init__(
        self,
        run: Callable[[ForwardBatch], torch.Tensor],
        buffers: StepBuffers,
        max_batch: int,
        lengths: list[int],
        capture: Capture,
        tolerance: float,
        path: str,
    ):
        self.run_step = run  # the eager forward: kv.prepare + the model, on a batch
        self.buffers = buffers
        self.sizes = batch_buckets(max_batch)
        self.lengths = lengths
        self.capture = capture
        self.tolerance = tolerance
        self.path = path
        self.graphs: dict[tuple[int, int], Replay] = {}
        self.verified: set[tuple[int, int]] = set()
        self.enabled = False
        self.reason = "not captured"
        self.capture_s = 0.0

    def capture_all(self) -> bool:
        """Capture every bucket (largest first); False, and eager from now on, if any fails."""
        started = time.perf_counter()
        try:
            for length in reversed(self.lengths):
                for size in reversed(self.sizes):
                    self.graphs[(size, length)] = self.capture(self._step(size, length))
        except Exception as exc:  # noqa: BLE001 - any failure means: run this model eagerly
            self.graphs.clear()
            self._disable(f"capture failed: {type(exc).__name__}: {exc}")
            return False
        self.capture_s = time.perf_counter() - started
        self.enabled, self.reason = True, ""
        log.info("decode steps run as CUDA graphs", extra={
            "forward": self.path, "graphs": len(self.graphs), "batch_buckets": self.sizes,
            "kv_length_buckets": self.lengths, "capture_s": round(self.capture_s, 2)})
        return True

    def bucket(self, n: int, max_ctx: int) -> tuple[int, int] | None:
        """The (batch, KV length) bucket for n decodes of at most `max_ctx` tokens, or None
        (eager)."""
        if not self.enabled:
            return None
        size = smallest_at_least(self.sizes, n)
        length = smallest_at_least(self.lengths, max_ctx)
        if size is None or length is None:
            return None
        return size, length

    def run(self, batch: ForwardBatch, eager: Callable[[ForwardBatch], torch.Tensor],
            ) -> torch.Tensor:
        """Logits [n, vocab] of a decode-only batch already padded to its bucket."""
        key = batch.graph
        replay = self.graphs.get(key) if self.enabled and key is not None else None
        if replay is None:
            return eager(batch)
        if key not in self.verified:
            return self._first_replay(batch, key, replay, eager)
        return replay()[: batch.n_dec]

    def _first_replay(self, batch: ForwardBatch, key: tuple[int, int], replay: Replay,
                      eager: Callable[[ForwardBatch], torch.Tensor]) -> torch.Tensor:
        """Check a bucket's first replay against the eager forward on the same step (both
        write the same keys and values to the same slots)."""
        expected = eager(batch)
        got = replay()[: batch.n_dec]
        reference = expected.float()
        error = float((got.float() - reference).abs().max()
                      / reference.abs().max().clamp_min(1e-6))
        if not error <= self.tolerance:
            self._disable(f"the first replay of bucket {key} differs from the eager forward "
                          f"by {error:.3g} (relative; allowed {self.tolerance})")
            return expected
        self.verified.add(key)
        log.debug("CUDA graph replay verified", extra={"bucket": key, "relative_error": error})
        return got

    def _step(self, size: int, length: int) -> Callable[[], torch.Tensor]:
        """The function a graph records: the eager forward on a static batch of `size` rows
        reading `length` KV tokens, over views of the step buffers."""
        self.buffers.load([], [], [], None, pad_to=size)  # the warm-up writes to scratch only
        ids, positions, rows, every = self.buffers.views(size)
        batch = ForwardBatch(ids, positions, every, [0] * size, [length - 1] * size, [],
                             dec_rows=rows, dec_pos=positions, token_rows=rows,
                             dec_max_ctx=length)

        def step() -> torch.Tensor:
            batch.masks.clear()  # a mask cached by the warm-up would leave the graph stale
            return self.run_step(batch)

        return step

    def _disable(self, reason: str) -> None:
        self.enabled, self.reason = False, reason
        self.graphs.clear()
        log.warning("CUDA graphs off for this model: decode steps run eagerly",
                    extra={"forward": self.path, "reason": reason})
