"""Operators' endpoints: `/admin/status` (JSON) and `/metrics` (Prometheus text)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.metrics import CAPACITY, QUEUE_DEPTH, REGISTRY, RUNNING, WORKERS
from shared.cluster_status import cluster_status

router = APIRouter()


async def _status(request: Request) -> dict[str, Any]:
    state = request.app.state.gateway
    return await cluster_status(state.redis, state.keys, state.settings.max_concurrent)


@router.get("/admin/status")
async def admin_status(request: Request) -> dict[str, Any]:
    """Queue depth, running permits, capacity and live workers, cluster-wide."""
    return await _status(request)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics; cluster gauges carry scope="cluster" (aggregate with max)."""
    status = await _status(request)
    QUEUE_DEPTH.labels(scope="cluster").set(status["queue_depth"])
    RUNNING.labels(scope="cluster").set(status["running"])
    CAPACITY.labels(scope="cluster").set(status["capacity"])
    WORKERS.labels(scope="cluster").set(len(status["workers"]))
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
