"""Liveness and readiness probes (always open, no key)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Redis answers and at least one worker is live; 503 otherwise."""
    state = request.app.state.gateway
    await state.workers.refresh()
    ready = state.workers.redis_ok and bool(state.workers.serving) and not state.draining
    body = {
        "status": "ready" if ready else "not_ready",
        "redis": state.workers.redis_ok,
        "workers": len(state.workers.serving),
        "draining": state.draining,
    }
    return JSONResponse(body, status_code=200 if ready else 503)
