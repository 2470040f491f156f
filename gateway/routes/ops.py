"""`GET /admin/history`: the ops page's chart data, behind the admin key like /admin/status.

Ten minutes of cluster-wide points, one per 5 s bucket (shared/ops_stats.py): tokens/s, the
highest queue depth a gateway sampled, rejected requests. 503 when Redis does not answer.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from chatstream_cluster.gateway.auth import require_admin

router = APIRouter(dependencies=[Depends(require_admin)])


@router.get("/admin/history")
async def admin_history(request: Request) -> dict[str, Any]:
    """Cluster-wide: `{scope, bucket_s, seconds, points: [{t, tokens_per_s, queue_depth,
    rejected}]}`, oldest first; the last point is the current, partly filled bucket."""
    return await request.app.state.gateway.ops_stats.history()
