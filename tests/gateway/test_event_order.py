"""EventOrder: a job's events in sequence, each once, whatever order and source they came from."""

from __future__ import annotations

import random

from chatstream_cluster.gateway.event_order import EventOrder
from chatstream_cluster.shared.schemas import TokenEvent


def ev(seq: int, text: str = "", finish: str | None = None) -> TokenEvent:
    return TokenEvent(job_id="j" * 32, seq=seq, attempt=1, text=text or f"t{seq} ",
                      finish_reason=finish)


def drain(order: EventOrder) -> list[int]:
    out = []
    while (event := order.pop()) is not None:
        out.append(event.seq)
    return out


def test_in_order_events_pass_straight_through() -> None:
    order = EventOrder()
    for seq in (1, 2, 3):
        order.take(ev(seq))
    assert not order.has_gap
    assert drain(order) == [1, 2, 3]
    assert order.next_seq == 4 and order.pending == 0


def test_a_gap_holds_later_events_until_it_is_filled() -> None:
    order = EventOrder()
    order.take(ev(1))
    order.take(ev(3))
    order.take(ev(4))
    assert drain(order) == [1]
    assert order.has_gap and order.pending == 2 and not order.ready
    order.take(ev(2))  # read back from the job's event stream
    assert not order.has_gap
    assert drain(order) == [2, 3, 4]


def test_duplicates_from_both_sources_are_dropped() -> None:
    order = EventOrder()
    for seq in (1, 2, 2, 1, 3, 3):
        order.take(ev(seq))
    assert drain(order) == [1, 2, 3]
    order.take(ev(2))  # already handed out
    order.take(ev(5))
    order.take(ev(5))  # already held behind the gap
    assert order.pending == 1
    order.take(ev(4))
    assert drain(order) == [4, 5]


def test_any_arrival_order_gives_each_event_once_in_sequence() -> None:
    rng = random.Random(7)
    for _ in range(50):
        arrivals = [ev(seq) for seq in range(1, 41)] * 2  # pub/sub and the repair both deliver
        rng.shuffle(arrivals)
        order = EventOrder()
        got: list[int] = []
        for event in arrivals:
            order.take(event)
            got += drain(order)
        assert got == list(range(1, 41))


def test_a_resume_starts_after_the_last_event_seen() -> None:
    order = EventOrder(next_seq=8)
    order.take(ev(7))
    order.take(ev(8))
    assert drain(order) == [8]
