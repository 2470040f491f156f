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
    """Redis answers, the gateway is subscribed, at least one worker is live, no background
    task is down and the gateway is not draining nor told to stop (503 from SIGTERM on, while
    it still serves for `--shutdown-grace`); 503 otherwise."""
    body = request.app.state.gateway.ready()
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)
