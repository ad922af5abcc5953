"""The broker guard (inferlog.epoch.BrokerGuard) over a scripted broker: two checks in a row that find
another broker end the service; a broker that cannot be read never does. The real broker path is
tests/faults/test_operator_redrive.py."""

from __future__ import annotations

import asyncio

import pytest

from inferlog import epoch
from inferlog.epoch import BrokerGuard, BrokerState
from inferlog.topics import Topics

SOUND = BrokerState("e1", ())


def scripted(monkeypatch: pytest.MonkeyPatch, states: list[BrokerState | Exception]) -> None:
    async def inspect(_bootstrap: str, _topics: Topics) -> BrokerState:
        state = states.pop(0) if states else SOUND
        if isinstance(state, Exception):
            raise state
        return state

    monkeypatch.setattr(epoch, "inspect_broker", inspect)


async def watched(states: list[BrokerState | Exception], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    scripted(monkeypatch, states)
    changes: list[str] = []
    guard = BrokerGuard("b:9092", Topics("p", 4), interval_s=0.001, on_change=changes.append)
    try:
        await asyncio.wait_for(guard.watch("e1"), 0.5)
    except TimeoutError:
        pass
    return changes


async def test_two_checks_in_a_row_that_find_another_broker_end_it(monkeypatch: pytest.MonkeyPatch) -> None:
    changes = await watched([SOUND, BrokerState(None, ("topic p.requests.v1 is missing",)),
                             BrokerState(None, ("topic p.requests.v1 is missing",))], monkeypatch)
    assert len(changes) == 1 and "p.requests.v1 is missing" in changes[0]
    changes = await watched([BrokerState("e2", ()), BrokerState("e2", ())], monkeypatch)
    assert len(changes) == 1 and "its epoch is e2" in changes[0]


async def test_one_odd_check_or_an_unreadable_broker_is_not_a_new_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    odd = BrokerState(None, ("no epoch marker on p.meta.v1",))
    assert await watched([odd, SOUND, odd, SOUND], monkeypatch) == []
    assert await watched([odd, OSError("refused"), TimeoutError(), SOUND], monkeypatch) == []
    assert await watched([OSError("refused")] * 50, monkeypatch) == []


async def test_start_waits_until_the_broker_is_sound(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, [OSError("refused"), BrokerState(None, ("topic p.meta.v1 is missing",)),
                           BrokerState("e7", ())])
    guard = BrokerGuard("b:9092", Topics("p", 4), interval_s=0.001, on_change=lambda _r: None)
    assert await asyncio.wait_for(guard.wait_until_sound(), 1) == "e7"


async def test_one_check_that_reads_another_epoch_ends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A readable marker of another epoch is never a blip: a service on the old log must stop before it
    # commits an old offset past records re-driven into the new one.
    changes = await watched([SOUND, BrokerState("e2", ()), SOUND, SOUND], monkeypatch)
    assert len(changes) == 1 and "its epoch is e2" in changes[0]


async def test_a_watch_that_fails_ends_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, [ValueError("a bug in the check")])
    changes: list[str] = []
    guard = BrokerGuard("b:9092", Topics("p", 4), interval_s=0.001, on_change=changes.append)
    task = guard.start_watching("e1")
    with pytest.raises(ValueError):
        await task
    await asyncio.sleep(0)
    assert len(changes) == 1 and "the broker check failed" in changes[0]
    cancelled = BrokerGuard("b:9092", Topics("p", 4), interval_s=10, on_change=changes.append).start_watching("e1")
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.sleep(0)
    assert len(changes) == 1, "a watch cancelled on the way out is not a failure"
