"""GPU and CPU usage of this worker's host, for the registry (ChatStream's /get_resource_usage)."""

from __future__ import annotations

import sys
from typing import Any

import psutil

GB = 1024**3


def _gpu_usage(device: str) -> list[dict[str, Any]]:
    torch = sys.modules.get("torch")  # never import torch here: mock workers run without it
    if torch is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return []
    index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return [
        {
            "index": index,
            "name": torch.cuda.get_device_name(index),
            "total_memory": round(total / GB, 3),
            "used_memory": round((total - free) / GB, 3),
        }
    ]


def resource_snapshot(device: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(gpus, cpu): memory in GB, as ChatStream reports it."""
    mem = psutil.virtual_memory()
    cpu = {
        "percent": psutil.cpu_percent(interval=None),
        "count": psutil.cpu_count(),
        "total_memory": round(mem.total / GB, 3),
        "used_memory": round((mem.total - mem.available) / GB, 3),
        "process_rss": round(psutil.Process().memory_info().rss / GB, 3),
    }
    return _gpu_usage(device), cpu
