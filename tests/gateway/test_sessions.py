"""Sessions on a real redis-server: signed cookies, history trimming, the turn lock, sliding TTL."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from chatstream_cluster.gateway.sessions.cookies import CookieSigner, new_sid
from chatstream_cluster.gateway.sessions.history import rendered_chars, trim_history
from chatstream_cluster.gateway.sessions.params import DEFAULT_PARAMS, sampling_for
from chatstream_cluster.gateway.sessions.store import Session, SessionStore
from chatstream_cluster.shared.keys import Keys


@pytest.fixture
def store(redis: aioredis.Redis, key_prefix: str) -> SessionStore:
    return SessionStore(redis, Keys(key_prefix), ttl_s=60, lock_lease_s=3)


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# --- cookies ---------------------------------------------------------------------------------
def test_sid_is_128_random_bits_in_hex() -> None:
    sids = {new_sid() for _ in range(1000)}
    assert len(sids) == 1000
    assert all(len(s) == 32 and int(s, 16) >= 0 for s in sids)


def test_signed_cookie_round_trips_and_rejects_tampering() -> None:
    signer = CookieSigner("secret-a")
    sid = new_sid()
    value = signer.sign(sid)
    assert signer.verify(value) == sid
    other = new_sid()
    forged = other + value[32:]  # another sid with this sid's signature
    bad_mac = value[:-1] + ("0" if value[-1] != "0" else "1")
    for bad in [forged, bad_mac, sid, value + "0", "", None, "../../etc." + value[33:],
                sid.upper() + value[32:], "x" * 5000, CookieSigner("secret-b").sign(sid)]:
        assert signer.verify(bad) is None, bad


def test_a_cookie_signed_for_one_key_does_not_verify_for_another() -> None:
    signer = CookieSigner("secret-a")
    sid = new_sid()
    for_alpha = signer.sign(sid, "alpha-key-id")
    assert signer.verify(for_alpha, "alpha-key-id") == sid
    assert signer.verify(for_alpha, "beta-key-id") is None
    assert signer.verify(for_alpha) is None  # nor without keys
    assert signer.verify(signer.sign(sid), "alpha-key-id") is None
    assert signer.verify(signer.sign(sid)) == sid  # no keys: as before keys existed


# --- history ---------------------------------------------------------------------------------
def test_trim_keeps_system_prompt_and_last_turn_and_drops_whole_turns() -> None:
    system = msg("system", "be brief")
    turns = []
    for i in range(10):
        turns += [msg("user", f"question {i} " + "x" * 100), msg("assistant", "y" * 200)]
    history = [system, *turns, msg("user", "last")]
    budget = rendered_chars([system]) + rendered_chars(turns[-4:]) + rendered_chars(history[-1:])
    kept = trim_history(history, budget)
    assert kept[0] == system
    assert kept[-1] == msg("user", "last")
    assert kept[1]["role"] == "user"  # no orphan reply at the start
    assert rendered_chars(kept) <= budget
    assert kept[1:] == history[-5:]
    assert trim_history(history, 10**9) == history


def test_trim_never_drops_the_last_turn_even_over_budget() -> None:
    history = [msg("user", "a" * 50), msg("assistant", "b" * 50), msg("user", "c" * 500),
               msg("assistant", "d" * 500)]
    assert trim_history(history, 10) == history[2:]
    assert trim_history([msg("user", "z" * 100)], 1) == [msg("user", "z" * 100)]


def test_sampling_maps_chatstream_params() -> None:
    sampling = sampling_for({**DEFAULT_PARAMS, "top_p_value": 0.0, "temperature": 0.2}, 77)
    assert sampling.max_tokens == 77
    assert sampling.temperature == 0.2
    assert sampling.top_k == 50
    assert 0 < sampling.top_p < 1e-3


# --- the store -------------------------------------------------------------------------------
async def test_turns_params_and_clear(store: SessionStore) -> None:
    sid = new_sid()
    session = await store.load(sid)
    assert session.history == [] and session.prompt is None and session.params() == DEFAULT_PARAMS
    history = [msg("user", "hi"), {"role": "assistant", "content": "hello", "id": "m1"}]
    assert await store.save_turn(session, history, "user: hi\nassistant: hello")
    await store.set_params(sid, {"temperature": 0.5, "top_k_value": 3})
    await store.set_params(sid, {"top_k_value": None})
    loaded = await store.load(sid)
    assert loaded.history == history and loaded.prompt == "user: hi\nassistant: hello"
    assert loaded.params() == {**DEFAULT_PARAMS, "temperature": 0.5}
    assert loaded.find_reply("m1") == 1 and loaded.find_reply("nope") is None
    assert loaded.created_ms > 0 and loaded.updated_ms >= loaded.created_ms
    await store.clear(sid)
    cleared = await store.load(sid)
    assert cleared.history == [] and cleared.prompt is None
    assert cleared.params()["temperature"] == 0.5  # params survive a clear


async def test_a_turn_that_ends_after_a_clear_does_not_restore_the_history(
    store: SessionStore,
) -> None:
    sid = new_sid()
    started = await store.load(sid)  # a turn starts from this state...
    await store.clear(sid)  # ...the user clears the context meanwhile...
    assert not await store.save_turn(started, [msg("user", "old")], "old")  # ...not saved
    assert (await store.load(sid)).history == []


async def test_ttl_slides_on_every_access(store: SessionStore, redis: aioredis.Redis) -> None:
    sid = new_sid()
    await store.save_turn(Session(sid), [msg("user", "x")], "p")
    key = store.keys.session(sid)
    assert 55_000 < await redis.pttl(key) <= 60_000
    await redis.pexpire(key, 1_000)
    await store.load(sid)
    assert await redis.pttl(key) > 55_000


async def test_lock_is_exclusive_refreshed_and_released_only_by_its_holder(
    store: SessionStore, redis: aioredis.Redis
) -> None:
    sid = new_sid()
    first = await store.lock(sid)
    assert first is not None
    assert await store.lock(sid) is None  # a second turn of the session: refused
    key = store.keys.session_lock(sid)
    await redis.pexpire(key, 1500)  # about to expire (the refresh runs every second)...
    async with asyncio.timeout(5):
        while True:
            if await redis.pttl(key) > 2000:
                break
            await asyncio.sleep(0.05)
    await first.release()  # ...but the holder refreshed it; now released
    assert await redis.exists(key) == 0
    second = await store.lock(sid)
    assert second is not None
    await first.release()  # a stale holder's release never frees another's lock
    assert await redis.exists(key) == 1
    await second.release()


async def test_a_lost_lock_is_not_deleted_by_its_old_holder(
    store: SessionStore, redis: aioredis.Redis
) -> None:
    sid = new_sid()
    old = await store.lock(sid)
    await redis.delete(store.keys.session_lock(sid))  # its lease ran out (gateway stalled)
    new = await store.lock(sid)
    assert new is not None
    await old.release()
    assert await redis.get(store.keys.session_lock(sid)) == new.token.encode()
    await new.release()


async def test_each_owner_keeps_at_most_its_cap_of_sessions(redis, key_prefix) -> None:  # noqa: ANN001
    keys = Keys(key_prefix)
    capped = SessionStore(redis, keys, ttl_s=60, max_per_owner=3)
    alpha = [new_sid() for _ in range(5)]
    for sid in alpha:
        await capped.set_params(sid, {"temperature": 0.5}, "alpha")
    beta = new_sid()
    await capped.clear(beta, "beta")
    await capped.load(alpha[2], "alpha")  # used again: now more recent than alpha[3]
    await capped.set_params(new_sid(), {"temperature": 0.1}, "alpha")
    alive = [sid for sid in alpha if await redis.exists(keys.session(sid))]
    assert alive == [alpha[2], alpha[4]]  # the least recently used went first
    assert await redis.exists(keys.session(beta))  # another owner's sessions are not touched
    assert await redis.zcard(keys.session_index("alpha")) == 3
