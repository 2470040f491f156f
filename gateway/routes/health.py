"""Liveness and readiness probes (always open, no key; GET and HEAD)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/healthz")
@router.head("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    """The process is alive (no Redis call: a Redis outage is /readyz's to report)."""
    return {"status": "ok"}


@router.get("/readyz")
@router.head("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    """Redis answers and at least one worker is live; 503 otherwise, and from SIGTERM on
    (`draining`), while the gateway still serves for `--shutdown-grace`."""
    state = request.app.state.gateway
    await state.workers.refresh()
    leaving = state.leaving or state.draining
    ready = state.workers.redis_ok and bool(state.workers.serving) and not leaving
    body = {
        "status": "ready" if ready else "not_ready",
        "redis": state.workers.redis_ok,
        "workers": len(state.workers.serving),
        "draining": leaving,
    }
    return JSONResponse(body, status_code=200 if ready else 503)
