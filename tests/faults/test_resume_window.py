"""Resuming streams, with real processes: exactly the rest, for the owner only, within the
resume window; at or past the end at once; one run however many resumes."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import redis as syncredis

from chatstream_cluster.shared.keys import Keys
from tests.cluster import wait_until
from tests.sse import body, expected, open_stream, stream

pytestmark = pytest.mark.slow

SLOW = {"mock_tokens_per_s": 40}


def meta(cluster, job_id: str) -> dict[str, str]:  # noqa: ANN001
    """The job's meta hash, without its packed spec."""
    client = syncredis.Redis.from_url(cluster.redis_url)
    try:
        raw = client.hgetall(Keys(cluster.key_prefix).job_meta(job_id))
    finally:
        client.close()
    return {k.decode(): v.decode() for k, v in raw.items() if k != b"spec"}


def job_of(event_id: str) -> str:
    return event_id.rsplit(":", 1)[0]


def admin(gateway) -> dict:  # noqa: ANN001
    return httpx.get(gateway.url + "/admin/status", timeout=5).json()


def test_gateway_killed_mid_stream_resume_elsewhere_gets_exactly_the_rest(cluster) -> None:  # noqa: ANN001
    """Resume 0.2 s, 3 s and 10 s after the client's gateway was SIGKILLed (all within the
    30 s window): the text is exact each time, whether the job was still running (0.2 s) or
    had been parked for lack of a listener (3 s, 10 s)."""
    cluster.start_worker("mock", max_batch=8, **SLOW)
    survivor = cluster.start_gateway()
    victims = {delay: cluster.start_gateway() for delay in (0.2, 3.0, 10.0)}
    cluster.wait_ready(survivor)
    results: dict[float, tuple[str, str, str | None, list[dict]]] = {}

    def scenario(delay: float) -> None:
        prompt, n = f"killed gateway {delay}", 160
        with open_stream(victims[delay].url, body(prompt, n)) as (resp, first):
            first.feed(stop_after_chunks=15)
            victims[delay].kill()
        time.sleep(delay)  # the outage the client lives through, not a synchronisation
        rest = stream(survivor.url, body(prompt, n), last_event_id=first.last_id)
        results[delay] = (first.text + rest.text, expected(prompt, n), rest.finish, rest.errors)

    threads = [threading.Thread(target=scenario, args=(d,)) for d in victims]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert set(results) == set(victims)
    for delay, (got, want, finish, errors) in results.items():
        assert errors == [], (delay, errors)
        assert finish == "length", delay
        assert got == want, f"resume after {delay}s: text lost or repeated"
    wait_until(lambda: admin(survivor)["running"] == 0, 20, what="permits back")


def test_resume_after_the_window_is_a_clear_410(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", **SLOW)
    gateway = cluster.start_gateway(resume_window=1.0)
    cluster.wait_ready(gateway)
    with open_stream(gateway.url, body("late", 200)) as (resp, first):
        first.feed(stop_after_chunks=5)
    job = job_of(first.last_id)
    wait_until(lambda: meta(cluster, job).get("status") == "parked", 10, what="job parked")
    time.sleep(1.5)  # let the 1 s resume window run out: the scenario itself
    late = stream(gateway.url, body("late", 200), last_event_id=first.last_id)
    assert late.status == 410
    assert late.json["error"]["code"] == "stream_expired"
    assert meta(cluster, job)["status"] == "expired"
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'chatstream_resumes_total{outcome="expired"} 1.0' in metrics


def test_another_key_cannot_read_or_end_a_stream(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", **SLOW)
    gateway = cluster.start_gateway(api_keys=["key-a", "key-b"])
    cluster.wait_ready(gateway)
    prompt, n = "mine", 120
    with open_stream(gateway.url, body(prompt, n), api_key="key-a") as (resp, owner):
        owner.feed(stop_after_chunks=5)
        for seq in ("0", owner.last_id.rsplit(":", 1)[1]):
            thief = stream(gateway.url, body(prompt, n), api_key="key-b",
                           last_event_id=f"{job_of(owner.last_id)}:{seq}")
            assert thief.status == 404
            assert thief.json["error"]["code"] == "stream_not_found"
        owner.feed()
    assert owner.errors == [] and owner.finish == "length"
    assert owner.text == expected(prompt, n)


def test_closing_the_old_socket_does_not_cut_the_resumed_stream(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", **SLOW)
    gw1, gw2 = cluster.start_gateway(), cluster.start_gateway()
    cluster.wait_ready(gw1)
    prompt, n = "two sockets", 150
    with open_stream(gw1.url, body(prompt, n)) as (old_resp, old):
        old.feed(stop_after_chunks=20)
        with open_stream(gw2.url, body(prompt, n), last_event_id=old.last_id) as (resp, new):
            new.feed(stop_after_chunks=3)
            old_resp.close()  # the old connection goes away after the resume took over
            new.feed()
    assert new.errors == [] and new.finish == "length"
    assert old.text + new.text == expected(prompt, n)


def test_resumes_at_or_past_the_end_return_at_once_and_hold_no_permit(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", max_batch=2, mock_tokens_per_s=50)  # a few tokens per event
    gateway = cluster.start_gateway(max_concurrent=2, queue_timeout=30)
    cluster.wait_ready(gateway)
    done = stream(gateway.url, body("finished", 20))
    assert done.finish == "length" and done.done
    ids = [int(i.rsplit(":", 1)[1]) for i in done.ids]
    assert len(ids) == len(set(ids)), f"SSE ids repeat: {done.ids}"
    job, finish_id = job_of(done.last_id), ids[-1]
    content_ids = ids[1:-1]

    at_end = stream(gateway.url, body("finished", 20), last_event_id=f"{job}:{content_ids[-1]}")
    assert (at_end.text, at_end.finish, at_end.done) == ("", "length", True)  # only its end
    middle = stream(gateway.url, body("finished", 20), last_event_id=f"{job}:{content_ids[0]}")
    assert done.text.endswith(middle.text) and 0 < len(middle.text) < len(done.text)
    assert middle.finish == "length"

    results: list = []
    running_seen: list[int] = []

    def past_end() -> None:
        results.append(stream(gateway.url, body("finished", 20),
                              last_event_id=f"{job}:999999999"))

    threads = [threading.Thread(target=past_end) for _ in range(16)]
    started = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        running_seen.append(admin(gateway)["running"])
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    assert len(results) == 16
    for r in results:
        assert (r.status, r.text, r.errors, r.done) == (200, "", [], True)
    assert set(running_seen) <= {0}, running_seen
    assert elapsed < 15, f"past-the-end resumes waited {elapsed:.1f}s"  # never a queue timeout
    past_finish = stream(gateway.url, body("finished", 20), last_event_id=f"{job}:{finish_id}")
    assert (past_finish.text, past_finish.errors, past_finish.done) == ("", [], True)
    normal = stream(gateway.url, body("after", 10))  # the cluster still admits at once
    assert normal.finish == "length"


def test_concurrent_resumes_run_the_job_once_and_count_against_the_key_cap(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", max_batch=4, **SLOW)
    gateway = cluster.start_gateway(api_keys=["k"], max_concurrent_per_key=2)
    cluster.wait_ready(gateway)
    prompt, n = "thirty resumes", 200
    with open_stream(gateway.url, body(prompt, n), api_key="k") as (resp, first):
        first.feed(stop_after_chunks=5)
    job = job_of(first.last_id)
    answers: list = []

    def resume() -> None:
        answers.append(stream(gateway.url, body(prompt, n), api_key="k",
                              last_event_id=first.last_id))

    threads = [threading.Thread(target=resume) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = sorted(a.status for a in answers)
    assert statuses.count(429) >= 28, statuses  # the per-key cap of 2 holds for resumes
    assert all(a.json["error"]["code"] == "per_key_limit" for a in answers if a.status == 429)
    served = [a for a in answers if a.status == 200]
    assert served
    for a in served:  # each one exact, or explicitly superseded by the other: never short
        if a.finish is not None:
            assert a.finish == "length" and first.text + a.text == expected(prompt, n)
        else:
            assert a.error_code == "stream_resumed_elsewhere", a.errors
    assert any(a.finish == "length" for a in served)
    state = meta(cluster, job)
    assert state["status"] == "done"
    assert int(state["attempt"]) == 2, state  # the first run, parked, then one continuation
    wait_until(lambda: admin(gateway)["running"] == 0 and admin(gateway)["queue_depth"] == 0,
               15, what="permits and queue back to zero")


def test_many_resumes_of_a_running_job_never_start_a_second_run(cluster) -> None:  # noqa: ANN001
    cluster.start_worker("mock", max_batch=8, **SLOW)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    prompt, n = "resume while running", 160
    with open_stream(gateway.url, body(prompt, n)) as (resp, first):
        first.feed(stop_after_chunks=5)
        answers: list = []

        def resume() -> None:
            answers.append(stream(gateway.url, body(prompt, n), last_event_id=first.last_id))

        threads = [threading.Thread(target=resume) for _ in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    job = job_of(first.last_id)
    assert int(meta(cluster, job)["attempt"]) == 1  # never run twice
    finished = [a for a in answers if a.finish == "length"]
    assert finished and all(first.text + a.text == expected(prompt, n) for a in finished)
    for a in answers:
        assert a.finish == "length" or a.error_code == "stream_resumed_elsewhere", a.errors
    assert admin(gateway)["running"] == 0
