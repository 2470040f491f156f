"""Operators' endpoints: `/admin/status` (JSON) and `/metrics` (Prometheus text).

Both read the cluster-wide numbers from Redis through `shared.cluster_status`, the same code
`chatstream status` uses, so every gateway and the CLI report the same values. When
`--admin-key` is set, both want `Authorization: Bearer <admin key>` (401 otherwise).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from gateway.errors import APIError
from gateway.metrics import CLUSTER_GAUGES, REGISTRY, set_cluster_gauges
from shared.cluster_status import cluster_status
from shared.redis_client import REDIS_ERRORS

log = logging.getLogger("chatstream.gateway")


async def require_admin_key(request: Request) -> None:
    """401 unless the request carries the admin key (when one is configured)."""
    key = request.app.state.gateway.settings.admin_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), key.encode()
    ):
        raise APIError(
            401,
            "this endpoint wants the admin key: send 'Authorization: Bearer <admin key>'",
            code="invalid_admin_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


router = APIRouter(dependencies=[Depends(require_admin_key)])


async def _status(request: Request) -> dict[str, Any]:
    state = request.app.state.gateway
    return await cluster_status(state.redis, state.keys, state.settings.max_concurrent)


@router.get("/admin/status")
async def admin_status(request: Request) -> dict[str, Any]:
    """Cluster-wide: queue_depth (waiting_for_permit + undelivered_jobs), running (permits
    held), capacity, and the live workers. 503 when Redis does not answer."""
    return await _status(request)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics. The cluster gauges carry scope="cluster": every gateway reports the
    same value, so aggregate them with max. Without Redis they are left out, and this
    gateway's own counters are still served."""
    try:
        set_cluster_gauges(await _status(request))
    except (*REDIS_ERRORS, RedisError) as exc:
        log.warning("metrics: cluster gauges unavailable", extra={"error": str(exc)})
        for gauge in CLUSTER_GAUGES:
            gauge.clear()
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
