"""Operators' endpoints: `/admin/status` (JSON) and `/metrics` (Prometheus text).

Both read the cluster-wide numbers from Redis through `shared.cluster_status`, the same code
`chatstream status` uses, so every gateway and the CLI report the same values. Access
(gateway/auth.py): with `--admin-key`, both want `Authorization: Bearer <admin key>` (401
otherwise); without one, they answer loopback clients only (403 for others).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from chatstream_cluster.gateway.auth import require_admin
from chatstream_cluster.gateway.metrics import (
    CLUSTER_GAUGES,
    REDIS_GAUGES,
    REGISTRY,
    set_cluster_gauges,
    set_redis_memory,
)
from chatstream_cluster.shared.redis_errors import TRANSIENT_REDIS_ERRORS

log = logging.getLogger("chatstream.gateway")

# The gateway app's AuthMiddleware applies the same rule first; the dependency keeps the
# router guarded wherever else it is mounted.
router = APIRouter(dependencies=[Depends(require_admin)])


async def _status(request: Request) -> dict[str, Any]:
    return await request.app.state.gateway.cluster_status()


@router.get("/admin/status")
async def admin_status(request: Request) -> dict[str, Any]:
    """Cluster-wide: queue_depth (waiting_for_permit + undelivered_jobs), running (permits
    held), capacity (the gateways' cap), and the live gateways and workers. 503 when Redis does
    not answer."""
    return await _status(request)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics. The cluster gauges (and Redis's memory) carry scope="cluster":
    every gateway reports the same value, so aggregate them with max. Without Redis they are
    left out, and this gateway's own counters are still served."""
    try:
        set_cluster_gauges(await _status(request))
        set_redis_memory(await request.app.state.gateway.redis.info("memory"))
    except TRANSIENT_REDIS_ERRORS as exc:
        log.warning("metrics: cluster gauges unavailable", extra={"error": str(exc)})
        for gauge in (*CLUSTER_GAUGES, *REDIS_GAUGES):
            gauge.clear()
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
