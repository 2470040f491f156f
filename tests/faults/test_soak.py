"""The short soak of `make test`: ~25 s of steady load through 3 gateways with random SIGKILLs
of workers and gateways, SIGSTOPs of workers and pub/sub connections cut (tests/soak.py).
`python -m bench --scenarios soak` runs the long form."""

from __future__ import annotations

import pytest

from tests.soak import Soak

pytestmark = pytest.mark.slow


@pytest.mark.timeout(240)
def test_soak_every_stream_is_exact_or_explicitly_failed(cluster) -> None:  # noqa: ANN001
    report = Soak(cluster, gateways=3, workers=3, clients=8, seed=13).run(seconds=25)
    print(report.row())  # shown with -s; the bench prints the long form's figures
    assert report.silently_truncated == 0, report.truncated_examples
    assert report.streams >= 20
    assert sum(report.faults.values()) >= 6
    assert report.exact >= report.streams // 2, report.row()
    assert report.settled, "permits, queue depth or workers did not return to the true values"
