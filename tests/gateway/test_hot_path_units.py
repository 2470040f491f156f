"""Unit tests for the relay hot path: wire form, chunk bytes, inbox wait, mock schedule."""

from __future__ import annotations

import asyncio
import time

import msgpack
import orjson
import pytest

from chatstream_cluster.gateway.completions.encode import ChunkEncoder
from chatstream_cluster.gateway.dispatcher import JobInbox
from chatstream_cluster.shared.events import EventWriter, PendingPublish, read_events
from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.schemas import (
    ChatMessage,
    JobError,
    SamplingParams,
    TokenEvent,
    Usage,
)
from chatstream_cluster.worker.engine_api import GenerationRequest
from chatstream_cluster.worker.mock_engine import MockEngine, mock_reply, render_prompt

EVENTS = [
    TokenEvent(job_id="a" * 32, seq=5, attempt=1, text="hello ", tokens=7, worker_id="w1"),
    TokenEvent(
        job_id="b" * 32, seq=9, attempt=2, text="x", tokens=9, finish_reason="error",
        usage=Usage(prompt_tokens=3, completion_tokens=9),
        error=JobError(code="c", message="m", status=400), prompt="p", worker_id="w2",
    ),
]


@pytest.mark.parametrize("event", EVENTS)
def test_token_event_wire_form_is_unchanged_and_round_trips(event: TokenEvent) -> None:
    wire = msgpack.packb(event.model_dump(mode="python", exclude_none=True), use_bin_type=True)
    assert event.pack() == wire
    back = TokenEvent.unpack(wire)
    assert back == event
    assert back.model_copy(update={"finish_reason": None}).finish_reason is None


def test_token_event_unpack_ignores_unknown_keys_and_needs_the_ids() -> None:
    event = TokenEvent.unpack(msgpack.packb({"job_id": "j", "seq": 1, "attempt": 1, "new": 3}))
    assert (event.job_id, event.text, event.finish_reason) == ("j", "", None)
    with pytest.raises(ValueError):
        TokenEvent.unpack(msgpack.packb({"seq": 1}))


@pytest.mark.parametrize("text", ["hello ", 'q"uote\\ \n\u00e9\U0001f600', "100% sure"])
def test_chunk_encoder_content_matches_the_full_chunk(text: str) -> None:
    enc = ChunkEncoder("ab" * 16, 'we%ird "model"', 17)
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    body = {**enc.head, "choices": [choice]}
    assert enc.content(text, 3) == b"id: %s:3\ndata: %s\n\n" % (enc.event_id, orjson.dumps(body))
    assert enc.content(text, 3) == enc.chunk({"content": text}, None, 3)


async def test_inbox_wait_wakes_times_out_and_rearms() -> None:
    inbox = JobInbox()
    started = time.monotonic()
    assert await inbox.wait(0.1) is False
    assert 0.09 < time.monotonic() - started < 0.5

    waiter = asyncio.create_task(inbox.wait(5))
    await asyncio.sleep(0.01)
    inbox.put(EVENTS[0])
    assert await waiter is True
    assert await inbox.wait(5) is True  # an event is queued: no wait at all
    inbox.events.clear()

    started = time.monotonic()  # a shorter wait after a longer armed timer still times out
    assert await inbox.wait(0.05) is False
    assert time.monotonic() - started < 0.5

    waiter = asyncio.create_task(inbox.wait(5))
    await asyncio.sleep(0.01)
    inbox.mark_lost()
    assert await waiter is True
    inbox.close()


def test_paced_mock_keeps_its_schedule_and_text() -> None:
    engine = MockEngine(max_batch=8, tokens_per_s=200)
    messages = {str(i): [ChatMessage(role="user", content=f"hi {i}")] for i in range(4)}
    for rid, msgs in messages.items():
        engine.submit(GenerationRequest(rid, msgs, SamplingParams(max_tokens=20)))
    resumed_from = mock_reply(render_prompt(messages["0"]), 7)
    engine.submit(GenerationRequest(
        "r", messages["0"], SamplingParams(max_tokens=20), resume_text=resumed_from,
        resume_tokens=7,
    ))
    text: dict[str, str] = {}
    started = time.monotonic()
    while engine.has_work():
        for out in engine.step():
            text[out.request_id] = text.get(out.request_id, "") + out.text
    assert 0.08 < time.monotonic() - started < 1.0  # 20 tokens at 200/s
    for rid, msgs in messages.items():
        assert text[rid] == mock_reply(render_prompt(msgs), 20)
    assert resumed_from + text["r"] == mock_reply(render_prompt(messages["0"]), 20)


async def test_publish_reloads_a_flushed_script(redis, key_prefix: str) -> None:  # noqa: ANN001
    keys = Keys(key_prefix)
    writer = EventWriter(redis, keys, 60)
    await redis.hset(keys.job_meta("j"), mapping={"attempt": 1})
    first = [PendingPublish(TokenEvent(job_id="j", seq=s, attempt=1, text=f"{s} "), "ch")
             for s in (1, 2)]
    await redis.script_flush()
    assert await writer.publish(first) == [0, 0]  # NOSCRIPT: loaded, sent again
    assert await writer.publish(first[:1]) == [-3]  # DUPLICATE
    await redis.script_flush()
    last = PendingPublish(TokenEvent(job_id="j", seq=3, attempt=1, finish_reason="stop"), "ch")
    assert await writer.publish([last]) == [0]
    stale = PendingPublish(TokenEvent(job_id="j", seq=4, attempt=0), "ch")
    assert await writer.publish([stale]) == [-1]  # FENCED
    assert [e.seq for e in await read_events(redis, keys, "j")] == [1, 2, 3]
