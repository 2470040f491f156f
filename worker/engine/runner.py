"""Runner: one forward per step, over the KV cache, with the fast path where the model allows.

`LlamaFastForward` (llama_forward.py) for Llama-shaped models with plain float weights, else
`HFForward` (hf_forward.py), the model's own code. Both take a `ForwardBatch` (batch.py) and
the KV cache and return the logits of the sampled tokens. This is the seam where CUDA graphs
will replay decode steps (captured per batch-size bucket over the same KV tensors, block
tables and step input buffers, all allocated once).
"""

from __future__ import annotations

from typing import Any

import torch

from chatstream_cluster.worker.engine.batch import ForwardBatch, StepBuffers, build_batch
from chatstream_cluster.worker.engine.hf_forward import HFForward
from chatstream_cluster.worker.engine.llama_forward import LlamaFastForward, supports_fast_forward
from chatstream_cluster.worker.engine.scheduler import StepPlan


class Runner:
    """Builds each step's batch from a plan and runs the model over it."""

    def __init__(self, model: Any, kv: Any, max_len: int, fast: bool = True, faults: Any = None,
                 max_step_tokens: int = 0):
        self.kv = kv
        self.device = next(model.parameters()).device
        self.buffers = StepBuffers(max_step_tokens, self.device) if max_step_tokens else None
        self.fast = fast and supports_fast_forward(model)
        self.forward = LlamaFastForward(model, max_len) if self.fast else HFForward(model)
        self.faults = faults

    def run(self, plan: StepPlan) -> torch.Tensor:
        """Logits [m, vocab]: one row per decode, then one per chunk that ends its prompt."""
        decodes = [(s.row, s.computed, s.last_token) for s in plan.decodes]
        chunks = [(s.row, s.computed, s.prompt_ids[s.computed : s.computed + n])
                  for s, n in plan.chunks]
        ends = [s.computed + n >= len(s.prompt_ids) for s, n in plan.chunks]
        return self.run_batch(build_batch(decodes, chunks, ends, self.device, self.buffers))

    def run_batch(self, batch: ForwardBatch, kv: Any = None) -> torch.Tensor:
        kv = kv if kv is not None else self.kv
        if self.faults is not None:
            self.faults.before_forward()
        kv.prepare(batch)
        return self.forward.forward(batch, kv)
