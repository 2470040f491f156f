"""Garbage in the job stream never kills a worker: it becomes a dead letter with a log line.

A unit-level hypothesis fuzz of `shared.jobqueue._decode_entry`, and one real-process test that
XADDs garbage next to a live mock worker and then asks it for a normal reply.
"""

from __future__ import annotations

import json

import httpx
import msgpack
import redis as sync_redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatstream_cluster.shared.jobqueue import JobEntry, _decode_entry
from chatstream_cluster.shared.keys import Keys, safe_id
from chatstream_cluster.shared.schemas import JobSpec
from tests.cluster import wait_until

# Values msgpack can carry, nested.
_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
            | st.text(max_size=20) | st.binary(max_size=20))
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)
# Dicts shaped like a JobSpec, with any values in its fields.
_spec_like = st.fixed_dictionaries(
    {},
    optional={
        "job_id": _values | st.text(max_size=40),
        "reply_channel": _values | st.text(max_size=20),
        "messages": _values | st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "bogus"]) | _values,
                                   "content": st.text(max_size=20) | _values}),
            max_size=3,
        ),
        "sampling": _values | st.fixed_dictionaries({}, optional={
            "max_tokens": _values, "temperature": _values, "stop": _values}),
        "return_prompt": _values,
    },
)
_spec_bytes = (st.binary(max_size=200) | _values.map(msgpack.packb)
               | _spec_like.map(msgpack.packb))
_fields = st.dictionaries(
    st.sampled_from([b"spec", b"job_id", b"x"]) | st.binary(max_size=8),
    st.binary(max_size=50) | _spec_bytes,
    max_size=4,
) | st.builds(lambda spec, extra: {b"spec": spec, **extra}, _spec_bytes,
              st.dictionaries(st.binary(max_size=8), st.binary(max_size=8), max_size=2))


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(entry_id=st.from_regex(r"\A[0-9]{1,13}-[0-9]{1,4}\Z"), fields=_fields | st.none())
def test_decode_entry_never_raises(entry_id: str, fields: dict[bytes, bytes] | None) -> None:
    entry = _decode_entry(entry_id.encode(), fields)
    assert isinstance(entry, JobEntry)
    assert entry.entry_id == entry_id
    if entry.spec is None:
        assert entry.error and len(entry.error) <= 500  # the dead letter's reason
    else:
        assert isinstance(entry.spec, JobSpec)


def test_decode_entry_reads_a_real_spec() -> None:
    spec = JobSpec(job_id="a" * 32, reply_channel="c", messages=[{"role": "user", "content": "x"}])
    entry = _decode_entry(b"1-0", {b"spec": spec.pack(), b"job_id": spec.job_id.encode()})
    assert entry.spec == spec and entry.error == ""


def _valid_spec(job_id: str) -> bytes:
    return JobSpec(job_id=job_id, reply_channel="nobody",
                   messages=[{"role": "user", "content": "hi"}]).pack()


GARBAGE: list[dict[bytes, bytes]] = [
    {b"spec": b"\xff\x00 not msgpack \xc1"},
    {b"other": b"no spec field"},
    {b"spec": msgpack.packb([1, 2, 3])},
    {b"spec": msgpack.packb({"job_id": 5, "messages": "nope"})},
    {b"spec": b""},
    {b"spec": msgpack.packb({"job_id": "j", "reply_channel": "c",
                             "messages": [{"role": "user", "content": "x"}],
                             "sampling": {"max_tokens": -1}})},
    {b"spec": msgpack.packb({"messages": [{"role": "user", "content": "x"}]}), b"job_id": b""},
]

# Decodes as a JobSpec, but its job id may not be part of a key name. Without a safe_id check in
# `_decode_entry` it raises UnsafeIdError in the worker's intake and kills the worker (and, being
# reclaimed, every worker after it).
POISON = {b"spec": _valid_spec("../../etc passwd"), b"job_id": b"x"}

def test_garbage_jobs_go_to_dead_letters_and_the_worker_keeps_serving(  # noqa: ANN001
    cluster, redis_url
) -> None:
    worker = cluster.start_worker("mock", max_batch=2)
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    keys = Keys(cluster.key_prefix)
    client = sync_redis.Redis.from_url(redis_url)
    try:
        for fields in GARBAGE:
            client.xadd(keys.job_stream("mock"), fields)
        wait_until(lambda: _dead_letters(client, keys, worker) >= len(GARBAGE), 15,
                   what="every garbage entry in the dead-letter stream")
        dead = client.xrange(keys.dead_letter)
        assert len(dead) == len(GARBAGE)
        assert all(f[b"reason"] for _, f in dead)
        assert client.xlen(keys.job_stream("mock")) == 0  # removed, not retried forever
    finally:
        client.close()

    assert worker.alive()
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    dead_lines = [r for r in lines if "dead letter" in r["msg"]]
    assert len(dead_lines) == len(GARBAGE), [r["msg"] for r in lines]
    assert all(r["level"] == "error" and r.get("entry_id") for r in dead_lines)

    reply = httpx.post(gateway.url + "/v1/chat/completions", timeout=15, json={
        "model": "mock", "messages": [{"role": "user", "content": "still there?"}],
        "max_tokens": 5})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 5
    assert worker.alive()


def _dead_letters(client: sync_redis.Redis, keys: Keys, worker) -> int:  # noqa: ANN001
    if not worker.alive():
        raise AssertionError(f"the worker died:\n{worker.log()[-3000:]}")
    return client.xlen(keys.dead_letter)


def test_decode_entry_rejects_a_spec_with_an_unsafe_job_id() -> None:
    entry = _decode_entry(b"1-0", POISON)
    assert entry.spec is None and entry.error


def test_a_spec_with_an_unsafe_job_id_does_not_kill_the_worker(cluster, redis_url) -> None:  # noqa: ANN001
    worker = cluster.start_worker("mock")
    gateway = cluster.start_gateway()
    cluster.wait_ready(gateway)
    keys = Keys(cluster.key_prefix)
    client = sync_redis.Redis.from_url(redis_url)
    try:
        client.xadd(keys.job_stream("mock"), POISON)
        wait_until(lambda: _dead_letters(client, keys, worker) == 1, 10, what="a dead letter")
    finally:
        client.close()
    assert worker.alive()


def test_safe_id_is_what_guards_the_key_names() -> None:
    # The worker keys a job's meta by its job id; a decoded spec's id must pass safe_id first.
    for hostile in ("../../etc passwd", "a b", "x\r\nDEL *", "", "a" * 129, "{tag}"):
        try:
            safe_id(hostile)
        except ValueError:
            continue
        raise AssertionError(f"safe_id accepted {hostile!r}")
