"""Generation leases on the real Redis: one attempt holds a request, no worker re-enters its own earlier
attempt, a lapsed lease is re-taken only if nobody else took it, and a finished attempt's lease stays
(done) until the store has recorded the result."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from inferlog.hot import Keys, Leases, LeaseState
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.integration


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
def keys() -> Keys:
    return Keys(f"tl{uuid.uuid4().hex[:8]}")


async def test_a_worker_cannot_re_enter_its_own_earlier_attempt(redis: Redis, keys: Keys) -> None:
    w1 = Leases(redis, keys, "w1", ttl_ms=2000)
    first, second = w1.new_value(), w1.new_value()
    assert first != second and first.startswith("w1/")
    assert await w1.acquire("r", first)
    assert not await w1.acquire("r", second), "the same worker took its own live lease again"
    assert await w1.state_of("r") == (LeaseState.LIVE, first)


async def test_a_batch_takes_every_free_lease_and_none_held_by_another(redis: Redis, keys: Keys) -> None:
    w1, w2 = Leases(redis, keys, "w1", ttl_ms=2000), Leases(redis, keys, "w2", ttl_ms=2000)
    theirs = w2.new_value()
    assert await w2.acquire("b", theirs)
    wanted = {request_id: w1.new_value() for request_id in ("a", "b", "c")}
    assert await w1.acquire_many(wanted) == {"a", "c"}
    assert await w1.state_of("b") == (LeaseState.LIVE, theirs)
    assert await w1.state_of("c") == (LeaseState.LIVE, wanted["c"])
    assert await w1.acquire_many({"a": w1.new_value()}) == set(), "re-entered its own earlier attempt"
    assert await w1.acquire_many({}) == set()


async def test_renewal_renews_retakes_a_lapsed_lease_and_reports_one_taken_by_another(
        redis: Redis, keys: Keys) -> None:
    w1, w2 = Leases(redis, keys, "w1", ttl_ms=300), Leases(redis, keys, "w2", ttl_ms=300)
    mine, retaken, lost = w1.new_value(), w1.new_value(), w1.new_value()
    assert await w1.acquire("mine", mine)
    assert await w1.acquire("lost", lost)
    await asyncio.sleep(0.4)  # both lapse (as if Redis had been unreachable for longer than the TTL)
    assert await w1.state_of("mine") == (LeaseState.FREE, None)
    assert await w2.acquire("lost", w2.new_value())  # a watcher took this one over meanwhile
    outcome = await w1.renew_many({"mine": mine, "retaken": retaken, "lost": lost})
    assert outcome == {"mine": Leases.RETAKEN, "retaken": Leases.RETAKEN, "lost": Leases.LOST}
    assert await w1.renew_many({"mine": mine}) == {"mine": Leases.RENEWED}
    assert (await w1.state_of("mine"))[1] == mine


async def test_a_done_lease_outlives_the_ttl_until_the_store_forgets_it(redis: Redis, keys: Keys) -> None:
    w1 = Leases(redis, keys, "w1", ttl_ms=200)
    value = w1.new_value()
    assert await w1.acquire("r", value)
    assert await w1.mark_done("r", value)
    await asyncio.sleep(0.3)
    assert await w1.state_of("r") == (LeaseState.DONE, value), "a finished attempt's lease expired early"
    assert not await w1.acquire("r", w1.new_value()), "finished work could be taken over"
    other = Leases(redis, keys, "w2", ttl_ms=200)
    assert not await other.mark_done("r", other.new_value()), "overwrote another attempt's lease"
    assert (await w1.state_of("r"))[1] == value
    await Leases(redis, keys, "result-store", ttl_ms=1).forget_recorded(["r"])
    assert await w1.state_of("r") == (LeaseState.FREE, None)


async def test_mark_done_refuses_a_lease_another_attempt_holds(redis: Redis, keys: Keys) -> None:
    w1, w2 = Leases(redis, keys, "w1", ttl_ms=2000), Leases(redis, keys, "w2", ttl_ms=2000)
    theirs = w2.new_value()
    assert await w2.acquire("r", theirs)
    assert not await w1.mark_done("r", w1.new_value())
    assert await w1.state_of("r") == (LeaseState.LIVE, theirs)


async def test_read_errors_raise_instead_of_reading_as_free(keys: Keys) -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        with pytest.raises(Exception) as info:
            await Leases(dead, keys, "w1", ttl_ms=1000).state_of("r")
        assert "Error" in type(info.value).__name__
    finally:
        await dead.aclose()


async def test_the_store_forgets_only_done_leases(redis: Redis, keys: Keys) -> None:
    w1 = Leases(redis, keys, "w1", ttl_ms=2000)
    live, done = w1.new_value(), w1.new_value()
    assert await w1.acquire("live", live)
    assert await w1.acquire("done", done) and await w1.mark_done("done", done)
    await Leases(redis, keys, "result-store", ttl_ms=1).forget_recorded(["live", "done"])
    assert await w1.state_of("live") == (LeaseState.LIVE, live), "a generating attempt lost its lease"
    assert await w1.state_of("done") == (LeaseState.FREE, None)
