"""The worker's lease and dispatch protocol, in milliseconds: the real GpuWorker with in-memory fakes of
the log, the ledger, the leases and the engine (no broker, no Redis, no Postgres, no model). Each test is
one interleaving that used to generate a request twice, lose a cancel, or fail a request for its engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from inferlog.errors import SideChannelUnavailable, StoreUnavailable
from inferlog.leasing import LeaseState, Renewal
from inferlog.messages import EventRecord, GenerationParams, ResultRecord, Status, TokenizedRecord
from inferlog.topics import Topics
from inferlog_worker.admission import Capacity, KvAdmission
from inferlog_worker.dispatch import GpuWorker, SideChannels
from inferlog_worker.runner import EngineFailed, GenerationDone, GenerationJob

TP = ("p.tokenized.interactive.v1", 0)
TOPICS = Topics("p", 4)


def _raw(request_id: str, offset: int) -> Any:
    record = TokenizedRecord(request_id=request_id, model="m", input_ids=[1, 2, 3],
                             params=GenerationParams(max_tokens=8))
    return SimpleNamespace(topic=TP[0], partition=TP[1], offset=offset, key=request_id.encode(),
                           value=record.model_dump_json().encode())


class FakeConsumer:
    def __init__(self) -> None:
        self.finished: list[int] = []

    def finish(self, tp: tuple[str, int], offset: int) -> None:
        self.finished.append(offset)

    def assignment(self) -> set[tuple[str, int]]:
        return {TP}


@dataclass
class FakeRunner:
    model: Any = field(default_factory=lambda: SimpleNamespace(name="m"))
    sampling: bool = True
    version: str = "v"
    vocab_size: int = 100
    context_length: int = 1000
    failure: str | None = None
    submitted: list[str] = field(default_factory=list)
    live: dict[str, asyncio.Future[GenerationDone]] = field(default_factory=dict)
    texts: dict[str, list[str]] = field(default_factory=dict)

    def submit(self, job: GenerationJob, on_text: Callable[[str, str], None] | None = None
               ) -> asyncio.Future[GenerationDone]:
        if self.failure is not None:
            raise EngineFailed(self.failure)
        future: asyncio.Future[GenerationDone] = asyncio.get_running_loop().create_future()
        self.submitted.append(job.request_id)
        self.live[job.request_id] = future
        return future

    def finish(self, request_id: str, reason: str = "length") -> None:
        self.live.pop(request_id).set_result(GenerationDone(request_id, [5, 6], "text", reason, None, 0.0))  # type: ignore[arg-type]

    def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        if request_id not in self.live:
            return False
        self.finish(request_id, reason)
        return True

    def fail(self, reason: str) -> None:
        self.failure = reason
        for future in self.live.values():
            future.set_exception(EngineFailed(reason))
        self.live.clear()

    def running_ids(self) -> list[str]:
        return list(self.live)


class FakeLedger:
    def __init__(self) -> None:
        self.terminal: dict[str, Status] = {}
        self.strikes: dict[str, int] = {}
        self.down = False

    async def dispatch_facts(self, ids: list[str]) -> dict[str, tuple[Status | None, int]]:
        if self.down:
            raise StoreUnavailable("ledger down")
        return {i: (self.terminal.get(i), self.strikes.get(i, 0)) for i in ids}

    async def terminal_statuses(self, ids: list[str]) -> dict[str, Status]:
        if self.down:
            raise StoreUnavailable("ledger down")
        return {i: self.terminal[i] for i in ids if i in self.terminal}


class FakeLeases:
    """In-memory leases with Leases' semantics; ``down`` makes every call raise like an unreachable Redis."""

    ttl_ms = 3000

    def __init__(self, holder: str, store: dict[str, str]) -> None:
        self.holder = holder
        self.store = store
        self.down = False
        self.n = 0

    def _check(self) -> None:
        if self.down:
            raise SideChannelUnavailable("redis down")

    def new_value(self) -> str:
        self.n += 1
        return f"{self.holder}/{self.n}"

    async def acquire(self, request_id: str, value: str) -> bool:
        self._check()
        if request_id in self.store:
            return False
        self.store[request_id] = value
        return True

    async def state_of(self, request_id: str) -> tuple[LeaseState, str | None]:
        self._check()
        value = self.store.get(request_id)
        if value is None:
            return LeaseState.FREE, None
        return (LeaseState.DONE, value[5:]) if value.startswith("done:") else (LeaseState.LIVE, value)

    async def renew_many(self, held: dict[str, str]) -> dict[str, int]:
        self._check()
        out = {}
        for request_id, value in held.items():
            current = self.store.get(request_id)
            if current is None:
                self.store[request_id] = value
                out[request_id] = Renewal.RETAKEN
            else:
                out[request_id] = Renewal.RENEWED if current == value else Renewal.LOST
        return out

    async def mark_done(self, request_id: str, value: str) -> bool:
        self._check()
        if self.store.get(request_id) in (value, None):
            self.store[request_id] = f"done:{value}"
            return True
        return False

    async def release(self, request_id: str, value: str) -> None:
        self._check()
        if self.store.get(request_id) == value:
            del self.store[request_id]


@dataclass
class Rig:
    worker: GpuWorker
    runner: FakeRunner
    consumer: FakeConsumer
    ledger: FakeLedger
    leases: FakeLeases
    published: list[tuple[str, str, Any]]

    def results(self, request_id: str) -> list[ResultRecord]:
        return [r for topic, key, r in self.published if topic == TOPICS.results and key == request_id]

    def attempts(self, request_id: str) -> int:
        return sum(1 for topic, key, r in self.published
                   if topic == TOPICS.events and key == request_id and isinstance(r, EventRecord))

    async def deliver(self, request_id: str, offset: int) -> None:
        await self.worker._triage(_raw(request_id, offset))
        self.worker._start_admitted()
        await settle()


async def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def rig(lease_store: dict[str, str] | None = None, holder: str = "w1") -> Rig:
    runner, consumer, ledger = FakeRunner(), FakeConsumer(), FakeLedger()
    leases = FakeLeases(holder, lease_store if lease_store is not None else {})
    worker = GpuWorker(worker_id=holder, runner=runner, consumer=consumer, publisher=None, topics=TOPICS,  # type: ignore[arg-type]
                       admission=KvAdmission(Capacity(10_000, 8)), watch_interval_s=0.001,
                       side=SideChannels(ledger=ledger, leases=leases))  # type: ignore[arg-type]
    published: list[tuple[str, str, Any]] = []

    async def publish(outgoing: list[Any]) -> None:
        published.extend(outgoing)

    worker._publish = publish  # type: ignore[method-assign]
    return Rig(worker, runner, consumer, ledger, leases, published)


async def test_a_re_delivered_copy_of_a_running_request_joins_it() -> None:
    r = rig()
    await r.deliver("a", 0)
    await r.deliver("a", 5)  # the same request again (a rebalance re-read it)
    assert r.runner.submitted == ["a"]
    r.runner.finish("a")
    await settle()
    assert len(r.results("a")) == 1 and sorted(r.consumer.finished) == [0, 5] and r.attempts("a") == 1


async def test_a_copy_arriving_just_after_the_result_was_published_is_skipped() -> None:
    r = rig()
    await r.deliver("a", 0)
    r.runner.finish("a")
    await settle()
    await r.deliver("a", 7)  # the store has not recorded it yet; the lease says done
    assert r.runner.submitted == ["a"] and 7 in r.consumer.finished and len(r.results("a")) == 1


async def test_a_revocation_during_preflight_and_re_assignment_generate_nothing_twice() -> None:
    r = rig()
    gate = asyncio.Event()
    real_facts = r.ledger.dispatch_facts

    async def slow_facts(ids: list[str]) -> dict[str, tuple[Status | None, int]]:
        await gate.wait()  # the preflight window, widened
        return await real_facts(ids)

    r.ledger.dispatch_facts = slow_facts  # type: ignore[method-assign]
    await r.worker._triage(_raw("a", 0))
    r.worker._start_admitted()
    await settle()
    r.worker.drop_revoked({TP})  # the partition moves away while "a" is in preflight...
    await r.deliver("a", 0)  # ...and comes back: the record is read again
    gate.set()
    await settle()
    assert r.runner.submitted == ["a"] and r.attempts("a") == 1


async def test_a_redis_read_error_while_watching_keeps_watching() -> None:
    store: dict[str, str] = {"a": "w2/1"}  # another worker generates "a"
    r = rig(store)
    await r.deliver("a", 0)
    assert r.worker._work["a"].state == "watching"
    r.leases.down = True
    await asyncio.sleep(0.02)  # many watch ticks, every read failing
    assert r.runner.submitted == [] and r.worker._work["a"].state == "watching"
    r.leases.down = False
    del store["a"]  # its holder died; the lease expired
    await asyncio.sleep(0.02)
    r.worker._start_admitted()
    await settle()
    assert r.runner.submitted == ["a"] and r.worker.takeovers == 1


async def test_a_lease_lost_mid_generation_cancels_it_and_publishes_nothing() -> None:
    store: dict[str, str] = {}
    r = rig(store)
    await r.deliver("a", 0)
    assert r.runner.submitted == ["a"]
    store["a"] = "w2/9"  # another attempt holds it now (ours lapsed during an outage and was taken)
    held = {rid: w.lease for rid, w in r.worker._held.items() if w.lease}
    for rid, verdict in (await r.leases.renew_many(held)).items():  # what the renewal loop does
        if verdict == Renewal.LOST:
            r.worker._lose(rid, held[rid])
    await settle()
    assert "a" not in r.runner.live and r.results("a") == []
    assert r.worker._work["a"].state == "watching", "its offsets stay uncommitted until the other attempt ends"


@pytest.mark.parametrize("window", ["waiting", "preflight", "admitted", "running"])
async def test_a_cancel_is_honoured_in_every_window(window: str) -> None:
    r = rig()
    r.worker._admission = KvAdmission(Capacity(10_000, 1))
    if window == "waiting":
        await r.deliver("busy", 0)  # the one slot is taken: "a" waits for room
        await r.deliver("a", 1)
        assert r.worker._work["a"].state == "waiting"
    elif window in ("preflight", "admitted"):
        gate = asyncio.Event()
        real_facts, real_acquire = r.ledger.dispatch_facts, r.leases.acquire

        async def slow_facts(ids: list[str]) -> dict[str, tuple[Status | None, int]]:
            if window == "preflight":
                await gate.wait()
            return await real_facts(ids)

        async def slow_acquire(request_id: str, value: str) -> bool:
            if window == "admitted":
                await gate.wait()
            return await real_acquire(request_id, value)

        r.ledger.dispatch_facts = slow_facts  # type: ignore[method-assign]
        r.leases.acquire = slow_acquire  # type: ignore[method-assign]
        await r.deliver("a", 1)
        assert r.worker._work["a"].state == "admitted"
    else:
        await r.deliver("a", 1)
        assert r.runner.submitted == ["a"]
    r.worker.cancel("a")
    if window in ("preflight", "admitted"):
        gate.set()
    await settle()
    [result] = r.results("a")
    assert result.status is Status.CANCELLED
    if window == "running":
        assert "a" not in r.runner.live, "still generating after its cancel"
    else:
        assert "a" not in r.runner.submitted, "the engine got a cancelled request"
    assert 1 in r.consumer.finished


async def test_an_engine_failure_publishes_nothing_and_commits_nothing_past_held_work() -> None:
    r = rig()
    await r.deliver("a", 0)
    await r.deliver("b", 1)
    r.runner.fail("injected")
    await settle()
    assert r.results("a") == r.results("b") == []
    assert r.consumer.finished == [], "offsets of work the failed engine held were let through"
    assert r.worker._work["a"].state == "running", "the worker must abandon it for another worker, not retry"


async def test_a_terminal_check_that_fails_is_never_read_as_not_terminal() -> None:
    r = rig()
    r.ledger.down = True
    await r.deliver("a", 0)
    await asyncio.sleep(0.05)
    assert r.runner.submitted == [], "ran on a failed read of the store"
    assert r.worker._work["a"].state == "waiting"
