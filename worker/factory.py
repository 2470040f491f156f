"""Build the engine that `--model` names."""

from __future__ import annotations

from shared.settings import WorkerSettings
from worker.engine_api import Engine


def make_engine(settings: WorkerSettings) -> Engine:
    """`mock` never imports torch; anything else loads a transformers model."""
    if settings.model == "mock":
        from worker.mock_engine import MockEngine

        return MockEngine(max_batch=settings.max_batch, tokens_per_s=settings.mock_tokens_per_s)
    from worker.engine import HFEngine

    return HFEngine(
        settings.model,
        device=settings.device,
        max_batch=settings.max_batch,
        dtype=settings.dtype,
        cache_dir=settings.model_cache_dir or None,
    )
