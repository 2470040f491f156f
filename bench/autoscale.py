"""The full autoscaling ramp (`python -m bench --scenarios autoscale`): tests/autoscale.py with
0 -> 100 concurrent streams -> 0 on one model while another serves steadily.

Both models' `mock` workers are started and stopped (SIGTERM) by KEDA's rule applied to the
gateway's `/metrics` (`replicas = ceil((queue depth + running) / --max-batch)`, clamped), each
with a fake 10-20 s cold start; the burst comes in through a gateway of its own (the module
docstring of tests/autoscale.py says why). One row: streams served and failed, the time from
the first waiting request to the first worker of the bursty model, its peak queue depth, its
peak and final replicas, the steady model's TTFT p99 without and during the burst, the workers
stopped (while streaming, or before they were live) and those that did not exit cleanly.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from chatstream_cluster.shared.redis_server import RedisServer
from tests.autoscale import Ramp
from tests.cluster import Cluster


def run_autoscale_bench(peak: int = 100) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis", appendonly=False).start()
        cluster = Cluster(redis.url, "autoscale", Path(tmp))
        try:
            report = Ramp(peak=peak, burst_batch=16, burst_max_replicas=8, burst_tokens=40,
                          ramp_up_s=10, hold_s=10, ramp_down_s=5).run(cluster)
            failed = [f"{r.model} {r.status} {r.problem}" for r in report.steady + report.burst
                      if not r.ok]
            return [{"scenario": "autoscale", "peak_streams": peak, **report.row(),
                     "first_error": failed[:3]}]
        finally:
            cluster.stop()
            redis.stop()
