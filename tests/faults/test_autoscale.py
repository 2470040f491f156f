"""The short autoscaling run of `make test` (tests/autoscale.py): two models, each scaled by
KEDA's rule on its own figures from /metrics, mock workers with a fake 2-4 s cold start
stopped with SIGTERM. The bursty model goes 0 -> 24 concurrent streams -> 0 while the steady
model serves throughout. The full ramp, to 100 streams with 10-20 s cold starts, is
`python -m bench --scenarios autoscale` (docs/performance.md, "Autoscaling")."""

from __future__ import annotations

import pytest

from tests.autoscale import Ramp

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_scale_from_zero_and_back_without_a_failed_stream(cluster) -> None:  # noqa: ANN001
    report = Ramp(peak=24, burst_batch=8, burst_max_replicas=3, burst_tokens=20,
                  burst_tokens_per_s=10,
                  cold_start="2-4", warmup_s=1, baseline_s=4, ramp_up_s=3, hold_s=3,
                  ramp_down_s=3, cooldown_s=3, down_every_s=1, stabilization_s=1).run(cluster)
    row = report.row()
    print(row)  # shown with -s; the bench prints the full ramp's figures
    assert report.scaler_errors == []
    failed = [(r.model, r.status, r.problem) for r in report.steady + report.burst if not r.ok]
    assert failed == []  # no 5xx, no error event, no dropped or truncated stream
    assert row["burst_streams"] >= 24 and row["steady_streams"] >= 10
    assert row["time_to_first_worker_s"] is not None
    assert row["peak_queue_depth"] >= 8  # the demand the scaler saw while workers started
    assert row["peak_replicas"] >= 2 and row["final_replicas"] == 0  # up, then down to 0
    assert row["workers_stopped"] >= 2 and row["unclean_exits"] == {}  # every drain was clean
    # The steady model kept serving through the burst. How fast (its TTFT p99 against its
    # baseline, target 1.5x) is a speed figure: the benchmark's, never a timed assertion here.
    assert len(report.ramp_ttft) >= 5, row
