"""Runner: one forward per step, over the KV cache, with the fast path where the model allows.

`LlamaFastForward` (llama_forward.py) for Llama-shaped models with plain float weights, else
`HFForward` (hf_forward.py), the model's own code. Both take a `ForwardBatch` (batch.py) and
the KV cache and return the logits of the sampled tokens.

A step's inputs go into `StepBuffers` (one copy per step into tensors allocated once). With
CUDA graphs on (cuda_graphs.py), a decode-only step whose batch fits a captured bucket is
padded to it in those same buffers and replays the bucket's graph instead of running eagerly.
"""

from __future__ import annotations

from typing import Any

import torch

from chatstream_cluster.worker.engine.batch import ForwardBatch, StepBuffers, batch_from_lists
from chatstream_cluster.worker.engine.hf_forward import HFForward
from chatstream_cluster.worker.engine.llama_forward import LlamaFastForward, supports_fast_forward
from chatstream_cluster.worker.engine.scheduler import StepPlan


class Runner:
    """Builds each step's batch from a plan and runs the model over it."""

    def __init__(self, model: Any, kv: Any, max_len: int, fast: bool = True, faults: Any = None,
                 max_step_tokens: int = 0):
        self.kv = kv
        self.device = next(model.parameters()).device
        pad_row = getattr(kv, "scratch_row", 0)
        self.buffers = (StepBuffers(max_step_tokens, self.device, pad_row)
                        if max_step_tokens else None)
        self.fast = fast and supports_fast_forward(model)
        self.forward_impl = LlamaFastForward(model, max_len) if self.fast else HFForward(model)
        self.faults = faults
        self.graphs: Any = None  # cuda_graphs.DecodeGraphs, once captured

    @property
    def path(self) -> str:
        """Which forward runs the model: "fast" or "hf" (the model's own code)."""
        return "fast" if self.fast else "hf"

    def prepare(self, plan: StepPlan) -> ForwardBatch:
        """The step's batch, in the step buffers (padded to a graph's bucket when one fits)."""
        decodes = plan.decodes
        ids = [s.last_token for s in decodes]
        positions = [s.computed for s in decodes]
        rows = [s.row for s in decodes]
        bucket = None
        if self.graphs is not None and not plan.chunks:
            bucket = self.graphs.bucket(len(ids), max(positions) + 1)
        chunks = [(s.row, s.computed, s.prompt_ids[s.computed : s.computed + n])
                  for s, n in plan.chunks]
        ends = [s.computed + n >= len(s.prompt_ids) for s, n in plan.chunks]
        batch = batch_from_lists(ids, positions, rows, chunks, ends, self.device, self.buffers,
                                 pad_to=bucket[0] if bucket else 0)
        batch.graph = bucket
        return batch

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [m, vocab]: one row per decode, then one per chunk that ends its prompt."""
        if self.faults is not None:
            self.faults.before_forward()
        if batch.graph is not None:
            return self.graphs.run(batch, self.eager)
        return self.eager(batch)

    def eager(self, batch: ForwardBatch, kv: Any = None) -> torch.Tensor:
        """The forward, run op by op."""
        kv = kv if kv is not None else self.kv
        kv.prepare(batch)
        return self.forward_impl.forward(batch, kv)

    def run(self, plan: StepPlan) -> torch.Tensor:
        """`prepare` then `forward`."""
        return self.forward(self.prepare(plan))

    def run_batch(self, batch: ForwardBatch, kv: Any = None) -> torch.Tensor:
        """A batch built elsewhere (start-up checks, profiling), eagerly."""
        if self.faults is not None:
            self.faults.before_forward()
        return self.eager(batch, kv)
