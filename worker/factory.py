"""Build the engine that `--model` names."""

from __future__ import annotations

import time

from shared.schemas import ChatMessage, SamplingParams
from shared.settings import WorkerSettings
from worker.engine_api import Engine, GenerationRequest


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
