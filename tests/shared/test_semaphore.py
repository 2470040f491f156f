"""RedisSemaphore against a real redis-server: capacity, FIFO, leases, vanished waiters, cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from chatstream_cluster.shared.keys import Keys
from chatstream_cluster.shared.semaphore import AcquireResult, RedisSemaphore, SemaphoreTimeout

ACQUIRED = AcquireResult(acquired=True, position=None, rejected=False)
REJECTED = AcquireResult(acquired=False, position=None, rejected=True)


def waiting(position: int) -> AcquireResult:
    return AcquireResult(acquired=False, position=position, rejected=False)


MakeSem = Callable[..., RedisSemaphore]


@pytest.fixture
async def make_sem(redis: aioredis.Redis, key_prefix: str) -> AsyncIterator[MakeSem]:
    """Semaphores on this test's keys; afterwards nothing may be held or waiting."""
    keys = Keys(key_prefix)
    names = {"global"}

    def make(client: aioredis.Redis | None = None, name: str = "global", **kw) -> RedisSemaphore:
        names.add(name)
        return RedisSemaphore(client or redis, keys, name, **kw)

    yield make
    for name in sorted(names):
        assert await RedisSemaphore(redis, keys, name).counts() == (0, 0), name


@pytest.fixture(autouse=True)
def _nothing_left_behind(make_sem: MakeSem) -> None:
    """Every test gets the held == 0 and waiting == 0 check of `make_sem`."""


async def until(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """Poll `check` until it holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_acquire_release_refresh_are_idempotent(make_sem: MakeSem) -> None:
    sem = make_sem()
    assert await sem.try_acquire("a", 2, 5) == ACQUIRED
    assert await sem.try_acquire("a", 2, 5) == ACQUIRED
    assert await sem.acquire("a", 2, 5, timeout=1) == ACQUIRED
    assert await sem.counts() == (1, 0)
    assert await sem.refresh(["a"]) == []
    assert await sem.refresh(["a", "a", "nope"]) == ["nope"]
    assert await sem.refresh([]) == []
    assert await sem.holders() == ["a"]
    assert await sem.release("a") is True
    assert await sem.release("a") is False
    assert await sem.refresh(["a"]) == ["a"]
    await sem.leave("a")
    assert await sem.counts() == (0, 0)


async def test_waiter_keeps_its_place_and_release_takes_it_out_of_line(make_sem: MakeSem) -> None:
    sem = make_sem()
    assert await sem.try_acquire("a", 1, 5) == ACQUIRED
    assert await sem.try_acquire("b", 1, 5) == waiting(0)
    assert await sem.try_acquire("c", 1, 5) == waiting(1)
    assert await sem.try_acquire("b", 1, 5) == waiting(0)
    assert await sem.waiters() == ["b", "c"]
    assert await sem.release("b") is False
    await sem.leave("c")
    await sem.leave("c")
    assert await sem.counts() == (1, 0)
    assert await sem.release("a") is True


async def test_capacity_never_exceeded_under_many_concurrent_acquirers(make_sem: MakeSem) -> None:
    gateways = [make_sem() for _ in range(3)]
    inside = 0
    most_inside = 0
    most_held = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal most_held
        while not done.is_set():
            held, _ = await gateways[0].counts()
            most_held = max(most_held, held)
            await asyncio.sleep(0)

    async def one(i: int) -> None:
        nonlocal inside, most_inside
        sem = gateways[i % len(gateways)]
        result = await sem.acquire(f"job-{i}", 3, 100, timeout=30, poll_interval=0.02)
        assert result == ACQUIRED
        inside += 1
        most_inside = max(most_inside, inside)
        await asyncio.sleep(0.01)  # the work done while holding the permit
        inside -= 1
        assert await sem.release(f"job-{i}") is True

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(one(i) for i in range(50)))
    done.set()
    await sampler
    assert most_inside == 3
    assert 1 <= most_held <= 3


async def test_fifo_service_order_across_gateways(make_sem: MakeSem) -> None:
    gateways = [make_sem() for _ in range(3)]
    assert await gateways[0].try_acquire("holder", 1, 10) == ACQUIRED
    order = [f"w{i}" for i in range(6)]
    for i, permit in enumerate(order):
        assert await gateways[i % 3].try_acquire(permit, 1, 10) == waiting(i)
    served: list[str] = []

    async def wait_turn(i: int, permit: str) -> None:
        sem = gateways[(i + 1) % 3]  # not the gateway it joined through
        assert await sem.acquire(permit, 1, 10, timeout=10, poll_interval=0.02) == ACQUIRED
        served.append(permit)
        assert await sem.release(permit) is True

    tasks = [asyncio.create_task(wait_turn(i, p)) for i, p in reversed(list(enumerate(order)))]
    assert await gateways[2].release("holder") is True
    await asyncio.gather(*tasks)
    assert served == order


async def test_newcomer_does_not_jump_the_line(make_sem: MakeSem) -> None:
    sem = make_sem()
    assert await sem.try_acquire("a", 1, 5) == ACQUIRED
    assert await sem.try_acquire("b", 1, 5) == waiting(0)
    assert await sem.release("a") is True
    assert await sem.try_acquire("late", 1, 5) == waiting(1)  # the free slot is b's
    assert await sem.try_acquire("b", 1, 5) == ACQUIRED
    assert await sem.try_acquire("late", 1, 5) == waiting(0)
    assert await sem.release("b") is True
    assert await sem.try_acquire("late", 1, 5) == ACQUIRED
    assert await sem.release("late") is True


async def test_full_line_is_rejected_at_once(make_sem: MakeSem) -> None:
    sem = make_sem()
    assert await sem.try_acquire("a", 1, 2) == ACQUIRED
    assert await sem.try_acquire("b", 1, 2) == waiting(0)
    assert await sem.try_acquire("c", 1, 2) == waiting(1)
    assert await sem.try_acquire("d", 1, 2) == REJECTED
    started = time.monotonic()
    assert await sem.acquire("d", 1, 2, timeout=10) == REJECTED
    assert time.monotonic() - started < 1
    assert await sem.try_acquire("c", 1, 2) == waiting(1)  # already in line: never rejected
    assert await sem.waiters() == ["b", "c"]
    for permit in ("a", "b", "c"):
        await sem.release(permit)
    assert await sem.try_acquire("e", 1, 0) == ACQUIRED  # a free slot needs no place in line
    assert await sem.try_acquire("f", 1, 0) == REJECTED
    await sem.release("e")


async def test_capacity_is_read_per_call(make_sem: MakeSem) -> None:
    sem = make_sem()
    assert await sem.try_acquire("a", 0, 5) == waiting(0)
    assert await sem.try_acquire("b", 0, 5) == waiting(1)
    assert await sem.try_acquire("b", 2, 5) == ACQUIRED  # both fit: a keeps its slot
    assert await sem.try_acquire("c", 2, 5) == waiting(1)
    assert await sem.try_acquire("a", 2, 5) == ACQUIRED
    assert await sem.try_acquire("c", 1, 5) == waiting(0)  # shrunk below held: all wait
    await sem.release("a")
    assert await sem.try_acquire("c", 1, 5) == waiting(0)
    await sem.release("b")
    assert await sem.try_acquire("c", 1, 5) == ACQUIRED
    await sem.release("c")


async def test_expired_lease_frees_the_permit(make_sem: MakeSem) -> None:
    dead = make_sem(lease_s=0.3)
    alive = make_sem()
    assert await dead.try_acquire("crashed", 1, 5) == ACQUIRED
    assert await alive.try_acquire("next", 1, 5) == waiting(0)
    await until(lambda: _held_is(alive, 0))
    assert await alive.try_acquire("next", 1, 5) == ACQUIRED
    assert await dead.release("crashed") is False
    assert await alive.release("next") is True


async def test_refresh_keeps_a_short_lease_alive(make_sem: MakeSem) -> None:
    sem = make_sem(lease_s=0.3)
    assert await sem.try_acquire("a", 1, 5) == ACQUIRED
    for _ in range(6):  # 0.6 s of time passing, twice the lease
        await asyncio.sleep(0.1)
        assert await sem.refresh(["a"]) == []
    assert await sem.holders() == ["a"]
    assert await sem.release("a") is True


async def test_vanished_waiter_is_dropped_and_the_line_moves_up(make_sem: MakeSem) -> None:
    sem = make_sem()
    gone_gateway = make_sem(waiter_ttl_s=0.3)
    assert await sem.try_acquire("a", 1, 5) == ACQUIRED
    assert await gone_gateway.try_acquire("ghost", 1, 5) == waiting(0)
    assert await sem.try_acquire("b", 1, 5) == waiting(1)

    async def b_is_head() -> bool:
        return await sem.try_acquire("b", 1, 5) == waiting(0)

    await until(b_is_head)
    assert await sem.waiters() == ["b"]
    await sem.release("a")
    assert await sem.try_acquire("b", 1, 5) == ACQUIRED
    await sem.release("b")


async def test_slow_polling_waiter_keeps_its_place(make_sem: MakeSem) -> None:
    sem = make_sem(waiter_ttl_s=0.3)
    assert await sem.try_acquire("a", 1, 5) == ACQUIRED
    task = asyncio.create_task(sem.acquire("b", 1, 5, timeout=30, poll_interval=10))
    await until(lambda: _waiters_are(sem, ["b"]))
    await asyncio.sleep(0.9)  # three waiter ttls of time passing
    assert await sem.waiters() == ["b"]
    assert await sem.try_acquire("c", 1, 5) == waiting(1)
    await sem.leave("c")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await sem.release("a")


async def test_cancelled_acquire_leaves_the_line_at_once(make_sem: MakeSem) -> None:
    sem = make_sem()
    assert await sem.try_acquire("a", 1, 5) == ACQUIRED
    task = asyncio.create_task(sem.acquire("b", 1, 5, timeout=30, poll_interval=10))
    await until(lambda: _waiters_are(sem, ["b"]))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await sem.waiters() == []
    assert await sem.try_acquire("c", 1, 5) == waiting(0)
    await sem.release("a")
    await sem.release("c")


async def test_timeout_raises_and_leaves_the_line(make_sem: MakeSem) -> None:
    sem = make_sem()
    assert await sem.try_acquire("a", 1, 5) == ACQUIRED
    started = time.monotonic()
    with pytest.raises(SemaphoreTimeout):
        await sem.acquire("b", 1, 5, timeout=0.3, poll_interval=0.05)
    assert 0.25 < time.monotonic() - started < 3
    assert await sem.waiters() == []
    await sem.release("a")


async def test_local_release_wakes_a_local_waiter_at_once(make_sem: MakeSem) -> None:
    sem = make_sem(waiter_ttl_s=60)  # no heartbeat-driven retry within the test
    assert await sem.try_acquire("a", 1, 5) == ACQUIRED
    positions: list[int] = []
    task = asyncio.create_task(
        sem.acquire("b", 1, 5, timeout=30, poll_interval=20, on_position=positions.append)
    )
    await until(lambda: _waiters_are(sem, ["b"]))
    started = time.monotonic()
    await sem.release("a")
    assert await asyncio.wait_for(task, 5) == ACQUIRED
    assert time.monotonic() - started < 1  # not the 20 s poll interval
    assert positions == [0]
    await sem.release("b")


async def test_on_position_reports_each_move_and_may_be_async(make_sem: MakeSem) -> None:
    sem = make_sem()
    assert await sem.try_acquire("a", 1, 5) == ACQUIRED
    assert await sem.try_acquire("b", 1, 5) == waiting(0)
    positions: list[int] = []

    async def report(position: int) -> None:
        positions.append(position)

    task = asyncio.create_task(
        sem.acquire("c", 1, 5, timeout=30, poll_interval=0.02, on_position=report)
    )
    await until(lambda: _positions_are(positions, [1]))
    await sem.release("a")
    assert await sem.acquire("b", 1, 5, timeout=5) == ACQUIRED
    await until(lambda: _positions_are(positions, [1, 0]))
    await sem.release("b")
    assert await asyncio.wait_for(task, 5) == ACQUIRED
    assert positions == [1, 0]
    await sem.release("c")


async def test_two_clients_compete_without_exceeding_capacity(
    make_sem: MakeSem, redis_url: str
) -> None:
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    try:
        sems = [make_sem(client) for client in clients]
        inside = 0
        most_inside = 0
        got: list[str] = []

        async def one(sem: RedisSemaphore, permit: str) -> None:
            nonlocal inside, most_inside
            assert await sem.acquire(permit, 2, 50, timeout=30, poll_interval=0.01) == ACQUIRED
            inside += 1
            most_inside = max(most_inside, inside)
            held, _ = await sems[1].counts()
            assert held <= 2
            await asyncio.sleep(0.005)
            inside -= 1
            got.append(permit)
            assert await sem.release(permit) is True

        await asyncio.gather(*(one(sems[i % 2], f"c{i % 2}-{i}") for i in range(24)))
        assert most_inside == 2
        assert {p.split("-")[0] for p in got} == {"c0", "c1"}
        assert len(got) == 24
    finally:
        for client in clients:
            await client.aclose()


async def test_semaphores_with_different_names_are_independent(make_sem: MakeSem) -> None:
    one, two = make_sem(name="gpu-a"), make_sem(name="gpu-b")
    assert await one.try_acquire("x", 1, 1) == ACQUIRED
    assert await two.try_acquire("y", 1, 1) == ACQUIRED
    assert await one.counts() == (1, 0)
    await one.release("x")
    await two.release("y")


async def test_works_with_decode_responses(make_sem: MakeSem, redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        sem = make_sem(client)
        assert await sem.try_acquire("a", 1, 5) == ACQUIRED
        assert await sem.try_acquire("b", 1, 5) == waiting(0)
        assert await sem.holders() == ["a"]
        assert await sem.waiters() == ["b"]
        assert await sem.release("b") is False
        assert await sem.release("a") is True
    finally:
        await client.aclose()


async def _held_is(sem: RedisSemaphore, held: int) -> bool:
    return (await sem.counts())[0] == held


async def _waiters_are(sem: RedisSemaphore, expected: list[str]) -> bool:
    return await sem.waiters() == expected


async def _positions_are(positions: list[int], expected: list[int]) -> bool:
    return positions == expected
