"""`/get_load` and `/get_resource_usage`: the cluster's load and memory in ChatStream's shapes.

The numbers are `shared.cluster_status`'s, the same as `/admin/status` and `chatstream status`.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from starlette.responses import Response

from chatstream_cluster.gateway.state import GatewayState


async def get_load(state: GatewayState) -> Response:
    """One entry per live worker; the cluster's single queue is spread over the serving
    workers so that their `waiting` sums to the queue depth."""
    status = await state.cluster_status()
    live = status["workers"]
    serving = [w["id"] for w in live if not w["draining"]]
    depth, max_queue = status["queue_depth"], state.settings.max_queue
    share, extra = divmod(depth, len(serving)) if serving else (0, 0)
    workers: list[dict[str, Any]] = []
    for w in live:
        rank = serving.index(w["id"]) if w["id"] in serving else -1
        workers.append({
            "name": w["id"], "processing": w["running"],
            "waiting": 0 if rank < 0 else share + (1 if rank < extra else 0),
            "max_processing": w["max_batch"], "max_waiting": max_queue,
            "host": w["host"], "model": w["model"], "device": w["device"],
            "draining": w["draining"],
        })
    cluster = {"processing": status["running"], "waiting": depth,
               "max_processing": status["capacity"], "max_waiting": max_queue,
               "workers": len(live)}
    return JSONResponse({"success": True, "message": "success",
                         "chatstream_workers": workers, "cluster": cluster})


async def get_resource_usage(state: GatewayState) -> Response:
    """GPU and CPU memory (GB) of every live worker, as the workers last reported it."""
    usage = [
        {"name": w.id, "host": w.host, "device": w.device, "num_gpus": len(w.gpus),
         "gpus": w.gpus, "cpu": w.cpu}
        for w, _age in await state.registry.live()
    ]
    return JSONResponse({"success": True, "message": "success", "memory_usage": usage})
