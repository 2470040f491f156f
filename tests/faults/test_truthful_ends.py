"""A stream that did not finish normally never looks complete, on either wire; background
tasks are supervised; a lapsed permit is handled; Redis errors are classified once."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
import redis as syncredis

from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.redis_server import RedisServer
from chatstream_cluster.shared.schemas import TokenEvent
from tests.cluster import Cluster, wait_until
from tests.faults.test_resume_window import admin, meta
from tests.sse import body, expected, open_stream, stream

pytestmark = pytest.mark.slow


def redis_client(cluster) -> syncredis.Redis:  # noqa: ANN001
    return syncredis.Redis.from_url(cluster.redis_url)


def test_chatstream_reply_cut_by_a_dead_worker_is_not_complete_and_never_runs_again(
    cluster,  # noqa: ANN001
) -> None:
    """The last worker dies mid-reply: the ChatStream response is left unfinished (the client
    sees a truncated body, not a normal end), the turn is not saved, the job is parked; a
    worker started later does not run it for nobody."""
    worker = cluster.start_worker("mock", mock_tokens_per_s=30, worker_ttl=1.0,
                                  job_claim_idle=1.0)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        first = client.post("/chat_stream", json={"user_input": "hello"})
        assert first.status_code == 200 and first.text.endswith("<::EOS::>")
        prompt_before = client.get("/get_prompt").json()["prompt"]
        chunks: list[str] = []
        with pytest.raises(httpx.RemoteProtocolError):
            with client.stream("POST", "/chat_stream", json={"user_input": "cut me"}) as resp:
                job = resp.headers["x-request-id"]
                for chunk in resp.iter_text():
                    chunks.append(chunk)
                    if len(chunks) == 3:
                        worker.kill()
        assert chunks, "no text before the worker died"
        assert client.get("/get_prompt").json()["prompt"] == prompt_before  # not saved
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'chatstream_streams_truncated_total{reason="no_worker"} 1.0' in metrics
    assert meta(cluster, job)["cancel"] == "1"  # stopped: whoever picks it up next parks it
    cluster.start_worker("mock", worker_ttl=1.0, job_claim_idle=1.0)
    wait_until(lambda: admin(gateway)["workers"], 30, what="the new worker")
    jobs = Keys(cluster.key_prefix).job_stream("mock")
    with redis_client(cluster) as r:  # the dead worker's entry is claimed, seen parked, dropped
        wait_until(lambda: r.xlen(jobs) == 0, 20, what="the parked job's entry to be dropped")
    state = meta(cluster, job)
    assert (state["status"], state["attempt"]) == ("parked", "1")


def test_openai_stream_cut_by_a_dead_worker_ends_with_an_error_not_a_stop(cluster) -> None:  # noqa: ANN001
    worker = cluster.start_worker("mock", mock_tokens_per_s=30, worker_ttl=1.0)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    with open_stream(gateway.url, body("cut", 200)) as (resp, record):
        record.feed(stop_after_chunks=3)
        worker.kill()
        record.feed()
    assert record.finish is None
    assert record.error_code == "no_worker"
    assert record.done  # the error event, then [DONE]
    cut = httpx.post(gateway.url + "/v1/chat/completions", timeout=30,
                     json={**body("cut", 5), "stream": False})
    assert cut.status_code == 503  # no worker left: a non-streaming request gets an error


def test_background_task_crash_is_logged_restarted_and_visible_in_readyz(cluster) -> None:  # noqa: ANN001
    """A WRONGTYPE is a bug, not an outage: the worker-cache task crashes (not "Redis
    unreachable"), /readyz says which task is down, and it recovers once the key is sane."""
    cluster.start_worker("mock")
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    workers = Keys(cluster.key_prefix).workers
    with redis_client(cluster) as r:
        r.delete(workers)
        r.set(workers, "not a sorted set")

        def down() -> dict | None:
            resp = httpx.get(gateway.url + "/readyz", timeout=5)
            body = resp.json()
            return body if resp.status_code == 503 and body["tasks_down"] else None

        body = wait_until(down, 10, what="readyz to report the crashed task")
        assert "worker-cache" in body["tasks_down"]
        assert "WRONGTYPE" in body["tasks_down"]["worker-cache"]
        r.delete(workers)
    wait_until(lambda: httpx.get(gateway.url + "/readyz").status_code == 200, 30,
               what="the task restarted (with backoff) and ready again")
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'chatstream_background_task_failures_total{task="worker-cache"}' in metrics
    assert "redis unreachable" not in gateway.log().lower()


def test_a_lapsed_permit_over_a_full_cap_ends_its_stream_explicitly(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", mock_tokens_per_s=20, max_batch=4)
    gateway = cluster.start_gateway(max_concurrent=1, permit_lease=1.5, queue_timeout=20)
    cluster.wait_ready(gateway)
    holders = Keys(cluster.key_prefix).sem_holders(Keys.model_semaphore("mock"))
    with open_stream(gateway.url, body("lapse", 200)) as (resp, record):
        record.feed(stop_after_chunks=2)
        with redis_client(cluster) as r:
            seconds, micros = r.time()
            # The permit is gone (what a long Redis stall does) and another holds the one slot.
            with r.pipeline(transaction=True) as pipe:
                pipe.delete(holders)
                pipe.zadd(holders, {"intruder": seconds * 1000 + micros // 1000 + 60_000})
                pipe.execute()
            record.feed()
            r.zrem(holders, "intruder")
    assert record.finish is None and record.error_code == "permit_lapsed"
    assert stream(gateway.url, body("after", 5)).finish == "length"
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'chatstream_permits_lapsed_total{outcome="ended"} 1.0' in metrics


def test_a_lapsed_permit_under_the_cap_is_taken_again(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", mock_tokens_per_s=30)
    gateway = cluster.start_gateway(permit_lease=1.5)
    cluster.wait_ready(gateway)
    holders = Keys(cluster.key_prefix).sem_holders(Keys.model_semaphore("mock"))
    with open_stream(gateway.url, body("retake", 60)) as (resp, record):
        record.feed(stop_after_chunks=2)
        with redis_client(cluster) as r:
            r.delete(holders)
            wait_until(lambda: r.zcard(holders) == 1, 5, what="the permit taken again")
        record.feed()
    assert record.finish == "length" and record.text == expected("retake", 60)
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'chatstream_permits_lapsed_total{outcome="retaken"} 1.0' in metrics


@pytest.fixture
def own_cluster(key_prefix, tmp_path):  # noqa: ANN001, ANN201
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    procs = Cluster(server.url, key_prefix, tmp_path)
    yield server, procs
    procs.stop()
    os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


def test_redis_frozen_3s_during_16_streams_none_ends_short(own_cluster) -> None:  # noqa: ANN001
    server, cluster = own_cluster
    cluster.start_worker("mock", max_batch=16, mock_tokens_per_s=25)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    results: dict[int, object] = {}
    started = threading.Barrier(17)

    def one(i: int) -> None:
        with open_stream(gateway.url, body(f"frozen {i}", 100), timeout=60) as (resp, rec):
            if rec.status == 200:
                rec.feed(stop_after_chunks=1)
                started.wait(30)
                rec.feed()
            else:
                started.wait(30)
            results[i] = rec

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    started.wait(30)
    os.kill(server.process.pid, signal.SIGSTOP)
    time.sleep(3)  # the freeze being tested
    os.kill(server.process.pid, signal.SIGCONT)
    for t in threads:
        t.join(90)
    assert len(results) == 16
    for i, rec in results.items():
        if rec.finish is not None:  # a normal end must be the whole reply
            assert rec.finish == "length" and rec.text == expected(f"frozen {i}", 100), i
        else:
            assert rec.error_code, f"stream {i} ended without finish or error"
    exact = sum(1 for r in results.values() if r.finish == "length")
    assert exact >= 1
    wait_until(lambda: admin(gateway)["running"] == 0, 30, what="permits back")


def test_an_event_lost_for_good_ends_the_stream_with_an_error(cluster) -> None:  # noqa: ANN001
    """A failover that lost a write leaves a hole in a job's events: the relay waits for it a
    while (it may still arrive), then says so instead of waiting forever or skipping it."""
    cluster.start_worker("mock")
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    keys, job = Keys(cluster.key_prefix), "c" * 32
    with redis_client(cluster) as r:
        r.hset(keys.job_meta(job), mapping={"status": "running", "owner": "open",
                                            "attempt": 1, "listener": "gone", "nonce": "n"})
        for seq, text, finish in ((1, "one ", None), (3, "three", "stop")):
            event = TokenEvent(job_id=job, seq=seq, attempt=1, text=text, finish_reason=finish)
            r.xadd(keys.job_events(job), {"e": event.pack()}, id=f"{seq}-0")
    resumed = stream(gateway.url, body("gap", 10), last_event_id=f"{job}:0", timeout=60)
    assert resumed.text == "one "  # never the text after the hole
    assert resumed.finish is None and resumed.error_code == "events_lost"
