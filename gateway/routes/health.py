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
    """Redis answers, the gateway is subscribed, at least one worker is live, no background
    task is down and the gateway is not draining; 503 otherwise."""
    body = request.app.state.gateway.ready()
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)
