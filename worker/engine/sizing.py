"""How big the KV cache is and how long a sequence may be, decided once at start-up.

- `--kv-cache-memory BYTES` fixes the cache's size. With 0 (auto): on CUDA, the cache takes
  what is left of `--gpu-memory-utilization` x the device's memory after the model, a
  profiled step's activations and other processes' use (vLLM's rule); on CPU, enough for
  `--max-batch` sequences of `--max-model-len` tokens, at most 512 MiB.
- `--max-model-len` (0: the model's context) is the longest sequence, prompt plus reply. An
  explicit value must fit the model and the cache; the default is clamped to the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from chatstream_cluster.worker.engine.kv_cache import CPU_AUTO_BUDGET
from chatstream_cluster.worker.engine.model_check import UnsupportedModel

log = logging.getLogger("chatstream.worker")

MIN_TOKENS = 64  # a cache smaller than this serves nothing useful


@dataclass(frozen=True)
class KVPlan:
    budget_bytes: int
    max_len: int


def plan_kv(
    *,
    device: torch.device,
    per_token: int,
    model_ctx: int,
    max_batch: int,
    kv_cache_memory: int,
    max_model_len: int,
    gpu_memory_utilization: float,
    profile: Callable[[], None] | None = None,
) -> KVPlan:
    """The cache's budget in bytes and the longest sequence (see the module docstring)."""
    if max_model_len > model_ctx:
        raise UnsupportedModel(
            f"--max-model-len {max_model_len} is longer than the model's context ({model_ctx})"
        )
    max_len = max_model_len or model_ctx
    if kv_cache_memory:
        budget = kv_cache_memory
    elif device.type == "cuda":
        budget = cuda_budget(device, gpu_memory_utilization, profile)
    else:
        budget = min(max_batch * max_len * per_token, CPU_AUTO_BUDGET)
    tokens = budget // per_token
    if tokens < MIN_TOKENS:
        raise UnsupportedModel(
            f"the KV cache holds {tokens} tokens ({budget} bytes at {per_token} bytes per "
            f"token); give it more (--kv-cache-memory, --gpu-memory-utilization)"
        )
    if tokens < max_len:
        if max_model_len:
            raise UnsupportedModel(
                f"--max-model-len {max_model_len} needs {max_model_len * per_token} bytes of KV "
                f"cache but it has {budget} (--kv-cache-memory, --gpu-memory-utilization)"
            )
        log.warning("max model length clamped to what the KV cache holds",
                    extra={"model_context": model_ctx, "max_model_len": tokens})
        max_len = tokens
    return KVPlan(budget, max_len)


def cuda_budget(
    device: torch.device, utilization: float, profile: Callable[[], None] | None
) -> int:
    """Bytes left for the cache on a CUDA device: utilization x total, minus the peak of a
    profiled step (model weights included) and what torch does not account for (the CUDA
    context, other processes)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    if profile is not None:
        profile()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = max(0, total - free - torch.cuda.memory_reserved(device))
    budget = int(total * utilization) - peak - outside_torch
    log.info("KV cache budget from device memory",
             extra={"total": total, "peak": peak, "outside_torch": outside_torch,
                    "budget": budget})
    return max(0, budget)


def fit_max_len(max_len: int, cache_tokens: int, explicit: int) -> int:
    """`max_len`, or what the cache holds when that is less (refused if it was explicit)."""
    if cache_tokens >= max_len:
        return max_len
    if explicit:
        raise UnsupportedModel(
            f"--max-model-len {explicit} does not fit the KV cache ({cache_tokens} tokens)"
        )
    return cache_tokens
