"""A worker whose engine step fails, with real processes: the engine resets, its jobs continue
in another attempt (the worker-crash path) and the client gets exactly the undisturbed text;
a worker whose steps keep failing leaves the cluster and exits non-zero.

Faults are injected with the test-only `CHATSTREAM_TEST_FAULTS` (worker/engine/faults.py),
passed to the worker process as the setting `test_faults`.
"""

from __future__ import annotations

import httpx
import pytest

from tests.cluster import wait_until
from tests.faults.test_worker_crash import StreamReader, expected

pytestmark = pytest.mark.slow

TAKEOVER = {"job_claim_idle": 1.0, "worker_ttl": 1.0, "mock_tokens_per_s": 40}


def test_a_failed_step_is_retried_from_the_text_so_far(cluster) -> None:  # noqa: ANN001
    worker = cluster.start_worker("mock", test_faults="raise@15", **TAKEOVER)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    reader = StreamReader(gateway.url, "step fails once", 60)
    reader.start()
    assert reader.done.wait(40)
    assert reader.errors == [] and reader.finish == "length"
    assert reader.text == expected("step fails once", 60)
    log = worker.log()
    assert "injected fault at forward 15" in log and "job handed over" in log
    assert "continuing job" in log  # the same worker took it back: one failure is not fatal
    assert worker.alive()


def _greedy(gateway, model: str, content: str) -> dict:  # noqa: ANN001
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": 40, "temperature": 0}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=60).json()


def test_a_failed_allocation_loses_no_text(cluster, demo_model_dir: str) -> None:  # noqa: ANN001
    worker = cluster.start_worker(demo_model_dir, test_faults="alloc@12", job_claim_idle=1.0,
                                  worker_ttl=1.0, max_batch=4)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway, timeout=120)
    readers = [StreamReader(gateway.url, f"allocation {i}", 40) for i in range(2)]
    for r in readers:
        r.body_extra = {"model": demo_model_dir, "temperature": 0}
        r.start()
    for r in readers:
        assert r.done.wait(60)
        assert r.errors == [] and r.finish == "length"
    log = worker.log()
    assert "can't allocate memory" in log and "job handed over" in log
    for r in readers:  # the same requests, undisturbed now (greedy: the same text)
        reply = _greedy(gateway, demo_model_dir, r.content)
        assert r.text == reply["choices"][0]["message"]["content"]
    assert worker.alive()


def test_a_worker_whose_steps_keep_failing_leaves_and_exits_non_zero(cluster) -> None:  # noqa: ANN001
    # A fails from its 3rd forward on and takes its job back quickly; B reclaims only jobs
    # idle for 6 s, so it gets the job once A has given up.
    bad = cluster.start_worker("mock", test_faults="raise@3+", job_claim_idle=0.5,
                               worker_ttl=1.0, mock_tokens_per_s=40)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    reader = StreamReader(gateway.url, "keeps failing", 50)
    reader.start()
    # B starts once A has the job (else B could read it first and A would never fail).
    wait_until(lambda: "engine step failed" in bad.log() or not bad.alive(), 30,
               what="the failing worker to take the job")
    good = cluster.start_worker("mock", job_claim_idle=6.0, worker_ttl=1.0, mock_tokens_per_s=40)
    assert bad.wait(30) == 1
    log = bad.log()
    assert log.count("engine step failed") == 3 and "leaving the cluster" in log
    assert reader.done.wait(40)
    assert reader.errors == [] and reader.finish == "length"
    assert reader.text == expected("keeps failing", 50)

    def only_good() -> bool:
        status = httpx.get(gateway.url + "/admin/status", timeout=5).json()
        return [w["id"] for w in status["workers"]] == [good.settings["worker_id"]]

    wait_until(only_good, 10, what="the failing worker to leave the registry")
