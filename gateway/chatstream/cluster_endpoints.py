"""`/get_load` and `/get_resource_usage`: the cluster's load and memory in ChatStream's shapes.

The numbers are `shared.cluster_status`'s, the same as `/admin/status` and `chatstream status`.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from starlette.responses import Response

from chatstream_cluster.gateway.state import GatewayState


async def get_load(state: GatewayState) -> Response:
    """One entry per live worker; each model's queue is spread over that model's serving
    workers, so that their `waiting` sums to the model's queue depth."""
    status = await state.cluster_status()
    live = status["workers"]
    depth_of = {m["name"]: m["queue_depth"] for m in status["models"]}
    max_queue = state.settings.max_queue
    workers: list[dict[str, Any]] = []
    for model, depth in depth_of.items():
        serving = [w["id"] for w in live if w["model"] == model and not w["draining"]]
        share, extra = divmod(depth, len(serving)) if serving else (0, 0)
        for w in (w for w in live if w["model"] == model):
            rank = serving.index(w["id"]) if w["id"] in serving else -1
            workers.append({
                "name": w["id"], "processing": w["running"],
                "waiting": 0 if rank < 0 else share + (1 if rank < extra else 0),
                "max_processing": w["max_batch"], "max_waiting": max_queue,
                "host": w["host"], "model": w["model"], "device": w["device"],
                "draining": w["draining"],
            })
    workers.sort(key=lambda w: w["name"])
    cluster = {"processing": status["running"], "waiting": status["queue_depth"],
               "max_processing": status["capacity"],
               "max_waiting": max_queue * max(1, len(depth_of)),  # --max-queue is per model
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
