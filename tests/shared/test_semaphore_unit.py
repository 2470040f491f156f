"""Fast checks of the semaphore's admission rules on fakeredis (its Lua runs on lupa)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.semaphore import AcquireResult, RedisSemaphore

fakeredis = pytest.importorskip("fakeredis")
pytest.importorskip("lupa")

ACQUIRED = AcquireResult(acquired=True, position=None, rejected=False)
REJECTED = AcquireResult(acquired=False, position=None, rejected=True)


def waiting(position: int) -> AcquireResult:
    return AcquireResult(acquired=False, position=position, rejected=False)


@pytest.fixture
async def sem() -> AsyncIterator[RedisSemaphore]:
    client = fakeredis.FakeAsyncRedis()
    yield RedisSemaphore(client, Keys("unit"))
    await client.aclose()


async def test_hold_wait_reject(sem: RedisSemaphore) -> None:
    assert await sem.try_acquire("a", 2, 2) == ACQUIRED
    assert await sem.try_acquire("b", 2, 2) == ACQUIRED
    assert await sem.try_acquire("c", 2, 2) == waiting(0)
    assert await sem.try_acquire("d", 2, 2) == waiting(1)
    assert await sem.try_acquire("e", 2, 2) == REJECTED
    assert await sem.counts() == (2, 2)
    assert await sem.holders() in (["a", "b"], ["b", "a"])
    assert await sem.waiters() == ["c", "d"]


async def test_release_serves_the_head_first(sem: RedisSemaphore) -> None:
    assert await sem.try_acquire("a", 1, 5) == ACQUIRED
    assert await sem.try_acquire("b", 1, 5) == waiting(0)
    assert await sem.try_acquire("c", 1, 5) == waiting(1)
    assert await sem.release("a") is True
    assert await sem.release("a") is False
    assert await sem.try_acquire("c", 1, 5) == waiting(1)
    assert await sem.try_acquire("new", 1, 5) == waiting(2)
    assert await sem.try_acquire("b", 1, 5) == ACQUIRED
    assert await sem.try_acquire("c", 1, 5) == waiting(0)


async def test_several_free_slots_serve_several_waiters(sem: RedisSemaphore) -> None:
    for permit, position in (("a", 0), ("b", 1), ("c", 2)):
        assert await sem.try_acquire(permit, 0, 5) == waiting(position)
    assert await sem.try_acquire("b", 2, 5) == ACQUIRED  # a and b both fit
    assert await sem.try_acquire("c", 2, 5) == waiting(1)
    assert await sem.try_acquire("new", 2, 5) == waiting(2)
    assert await sem.try_acquire("a", 2, 5) == ACQUIRED


async def test_capacity_zero_admits_nobody(sem: RedisSemaphore) -> None:
    assert await sem.try_acquire("a", 0, 5) == waiting(0)
    assert await sem.try_acquire("a", 0, 5) == waiting(0)
    assert await sem.try_acquire("b", 0, 0) == REJECTED
    assert await sem.counts() == (0, 1)


async def test_refresh_reports_the_permits_not_held(sem: RedisSemaphore) -> None:
    assert await sem.try_acquire("a", 1, 5) == ACQUIRED
    assert await sem.try_acquire("b", 1, 5) == waiting(0)
    assert await sem.refresh(["a", "b", "c"]) == ["b", "c"]
    await sem.leave("b")
    assert await sem.counts() == (1, 0)
