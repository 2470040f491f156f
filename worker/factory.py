"""Build the engine that `--model` names."""

from __future__ import annotations

import os
import time

from chatstream_cluster.shared.schemas import ChatMessage, SamplingParams
from chatstream_cluster.shared.settings import WorkerSettings
from chatstream_cluster.worker.engine_api import Engine, GenerationRequest


def make_engine(settings: WorkerSettings) -> Engine:
    """`mock` never imports torch; anything else loads a transformers model."""
    if settings.model == "mock":
        from chatstream_cluster.worker.mock_engine import MockEngine

        return MockEngine(max_batch=settings.max_batch, tokens_per_s=settings.mock_tokens_per_s)
    from chatstream_cluster.worker.engine import HFEngine

    return HFEngine(
        settings.model,
        device=settings.device,
        max_batch=settings.max_batch,
        dtype=settings.dtype,
        cache_dir=settings.model_cache_dir or None,
        threads=torch_threads(settings),
        kv_cache_memory=settings.kv_cache_memory,
        max_model_len=settings.max_model_len,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        kv_layout=settings.kv_layout,
        cuda_graphs=settings.cuda_graphs,
        decode_attention=settings.decode_attention,
    )


def torch_threads(settings: WorkerSettings) -> int:
    """`--torch-threads`, or auto: on CPU one core fewer than this process may use (at least
    one), so generation never competes with the worker's own I/O thread, Redis or a gateway
    on the same machine; on CUDA torch's default (0)."""
    if settings.torch_threads:
        return settings.torch_threads
    if settings.device != "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1)


def warm_up(engine: Engine, timeout: float = 60.0) -> None:
    """Run one short request so the first real one does not pay for lazy initialisation."""
    engine.submit(GenerationRequest(
        request_id="warm-up",
        messages=[ChatMessage(role="user", content="warm up")],
        sampling=SamplingParams(max_tokens=4, temperature=0.0),
    ))
    deadline = time.monotonic() + timeout
    while engine.has_work() and time.monotonic() < deadline:
        engine.step()
    faults = getattr(engine, "faults", None)
    if faults is not None:  # test-only fault injection counts from the first real step
        faults.armed = True
