"""The worker's lease and dispatch protocol, in milliseconds: the real GpuWorker with in-memory fakes of
the log, the ledger, the leases, the cancel flags and the engine (no broker, no Redis, no Postgres, no
model), on a fake clock (looptime: the loop's time jumps to the next timer when nothing is ready, so a
30-second lease or watch interval costs no real time). Each test is one interleaving that used to generate
a request twice, lose a cancel, or fail a request for its engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio

from inferlog.errors import SideChannelUnavailable, StoreUnavailable
from inferlog.leasing import LeaseState, Renewal
from inferlog.messages import (
    DispatchFacts,
    EventRecord,
    GenerationParams,
    Priority,
    ResultRecord,
    Status,
    TokenizedRecord,
)
from inferlog.topics import Topics
from inferlog_worker.admission import Capacity, KvAdmission
from inferlog_worker.dispatch import GpuWorker, SideChannels, _Work
from inferlog_worker.runner import EngineFailed, GenerationDone, GenerationJob

# Each test on a fresh event loop of its own with fake time: the session's shared loop can hold what earlier
# tests left behind (connections, tasks), and fake time only jumps while the loop is otherwise idle.
pytestmark = [pytest.mark.looptime, pytest.mark.asyncio(loop_scope="function")]

TP = ("p.tokenized.interactive.v1", 0)
TOPICS = Topics("p", 4)


def _raw(request_id: str, offset: int) -> Any:
    record = TokenizedRecord(request_id=request_id, model="m", input_ids=[1, 2, 3],
                             params=GenerationParams(max_tokens=8))
    return SimpleNamespace(topic=TP[0], partition=TP[1], offset=offset, key=request_id.encode(),
                           value=record.model_dump_json().encode())


class FakeConsumer:
    """One partition: ``pending`` is what the next fetch returns; ``committed`` the offset committed, the
    lowest offset not yet finished (as TierConsumer commits)."""

    def __init__(self) -> None:
        self.finished: list[int] = []
        self.pending: list[Any] = []
        self.fetched = 0
        self.committed = 0

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def pause_all(self) -> None: ...
    def resume_only(self, topics: set[str]) -> None: ...

    async def fetch(self, max_records: int, timeout_ms: int = 50) -> list[Any]:
        if not self.pending:
            await asyncio.sleep(timeout_ms / 1000)
        batch, self.pending = self.pending[:max_records], self.pending[max_records:]
        self.fetched += len(batch)
        return batch

    def finish(self, tp: tuple[str, int], offset: int) -> None:
        self.finished.append(offset)

    async def commit(self, only: set[tuple[str, int]] | None = None) -> dict[tuple[str, int], int]:
        while self.committed in self.finished:
            self.committed += 1
        return {TP: self.committed}

    def assignment(self) -> set[tuple[str, int]]:
        return {TP}


@dataclass
class FakeRunner:
    model: Any = field(default_factory=lambda: SimpleNamespace(name="m"))
    version: str = "v"
    vocab_size: int = 100
    context_length: int = 1000
    failure: str | None = None
    submitted: list[str] = field(default_factory=list)
    live: dict[str, asyncio.Future[GenerationDone]] = field(default_factory=dict)
    abandoned: set[str] = field(default_factory=set)

    def steps(self) -> int:
        return 0

    def stopped_reason(self) -> str | None:
        return None

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
        self.abandoned |= set(self.live)
        for future in self.live.values():
            future.set_exception(EngineFailed(reason))
        self.live.clear()

    def running_ids(self) -> list[str]:
        return list(self.live)


class FakeLedger:
    def __init__(self) -> None:
        self.terminal: dict[str, Status] = {}
        self.strikes: dict[str, int] = {}
        self.cancelled: set[str] = set()
        self.down = False
        self.reads: list[list[str]] = []

    async def dispatch_facts(self, ids: list[str]) -> dict[str, DispatchFacts]:
        self.reads.append(list(ids))
        if self.down:
            raise StoreUnavailable("ledger down")
        return {i: DispatchFacts(self.terminal.get(i), self.strikes.get(i, 0), i in self.cancelled) for i in ids}

    async def record_engine_failure(self, ids: list[str]) -> None:
        for i in ids:
            self.strikes[i] = self.strikes.get(i, 0) + 1

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
        self.round_trips = 0

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

    async def acquire_many(self, wanted: dict[str, str]) -> set[str]:
        self._check()
        self.round_trips += 1
        return {request_id for request_id, value in wanted.items() if await self.acquire(request_id, value)}

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

    async def release_many(self, held: dict[str, str]) -> None:
        for request_id, value in held.items():
            await self.release(request_id, value)


class FakeCancels:
    def __init__(self) -> None:
        self.flags: set[str] = set()

    async def flagged(self, ids: list[str]) -> set[str]:
        return self.flags & set(ids)


@dataclass
class Rig:
    worker: GpuWorker
    runner: FakeRunner
    consumer: FakeConsumer
    ledger: FakeLedger
    leases: FakeLeases
    cancels: FakeCancels
    published: list[tuple[str, str, Any]]

    def results(self, request_id: str) -> list[ResultRecord]:
        return [r for topic, key, r in self.published if topic == TOPICS.results and key == request_id]

    def attempts(self, request_id: str) -> int:
        return sum(1 for topic, key, r in self.published
                   if topic == TOPICS.events and key == request_id and isinstance(r, EventRecord))

    async def deliver(self, request_id: str, offset: int) -> None:
        await self.deliver_batch([(request_id, offset)])

    async def deliver_batch(self, copies: list[tuple[str, int]]) -> None:
        """One fetch: triage each record, then admit and preflight them together."""
        for request_id, offset in copies:
            await self.worker._triage(_raw(request_id, offset))
        self.worker._start_admitted()
        await settle()

    def cancel(self, request_id: str) -> None:
        """What the gateway does: record it in the ledger, set the flag, then notify the workers."""
        self.ledger.cancelled.add(request_id)
        self.cancels.flags.add(request_id)
        self.worker.cancel(request_id)

    def slow(self, target: Any, name: str) -> asyncio.Event:
        """Make ``target.name`` wait for the returned gate before it answers (a stalled store or Redis)."""
        gate = asyncio.Event()
        real = getattr(target, name)

        async def waiting(*args: Any) -> Any:
            await gate.wait()
            return await real(*args)

        setattr(target, name, waiting)
        return gate


RIGS: list[Rig] = []


@pytest_asyncio.fixture(autouse=True, loop_scope="function")
async def _stop_rigs() -> Any:
    """Each test's worker tasks end with it, on its loop."""
    yield
    tasks = [task for rig in RIGS for task in rig.worker._tasks]
    RIGS.clear()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def rig(lease_store: dict[str, str] | None = None, holder: str = "w1") -> Rig:
    runner, consumer, ledger, cancels = FakeRunner(), FakeConsumer(), FakeLedger(), FakeCancels()
    leases = FakeLeases(holder, lease_store if lease_store is not None else {})
    worker = GpuWorker(worker_id=holder, runner=runner, consumer=consumer, publisher=None, topics=TOPICS,  # type: ignore[arg-type]
                       admission=KvAdmission(Capacity(10_000, 8)), watch_interval_s=1.0,
                       side=SideChannels(ledger=ledger, leases=leases, cancels=cancels))  # type: ignore[arg-type]
    published: list[tuple[str, str, Any]] = []

    async def publish(outgoing: list[Any]) -> None:
        published.extend(outgoing)

    worker._publish = publish  # type: ignore[method-assign]
    RIGS.append(Rig(worker, runner, consumer, ledger, leases, cancels, published))
    return RIGS[-1]


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

    async def slow_facts(ids: list[str]) -> dict[str, DispatchFacts]:
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
    await asyncio.sleep(60)  # sixty watch ticks (fake time), every read failing
    assert r.runner.submitted == [] and r.worker._work["a"].state == "watching"
    r.leases.down = False
    del store["a"]  # its holder died; the lease expired
    await asyncio.sleep(2)
    r.worker._start_admitted()
    await settle()
    assert r.runner.submitted == ["a"] and r.worker.takeovers == 1


async def test_a_lease_lost_mid_generation_cancels_it_and_publishes_nothing() -> None:
    store: dict[str, str] = {}
    r = rig(store)
    renewing = asyncio.create_task(r.worker._renew_leases_forever())
    await r.deliver("a", 0)
    assert r.runner.submitted == ["a"]
    r.leases.down = True  # Redis unreachable for longer than the lease's TTL: renewals fail, "a" goes on
    await asyncio.sleep(10)
    assert "a" in r.runner.live, "a renewal error is not a loss"
    store["a"] = "w2/9"  # ...meanwhile the lease lapsed and another worker took it
    r.leases.down = False
    await asyncio.sleep(2)  # the next renewal finds it held by another attempt
    renewing.cancel()
    assert "a" not in r.runner.live and r.results("a") == []
    assert r.worker._work["a"].state == "watching", "its offsets stay uncommitted until the other attempt ends"


async def test_a_lapsed_lease_nobody_took_is_re_taken_and_the_generation_goes_on() -> None:
    store: dict[str, str] = {}
    r = rig(store)
    renewing = asyncio.create_task(r.worker._renew_leases_forever())
    await r.deliver("a", 0)
    value = store["a"]
    r.leases.down = True
    await asyncio.sleep(10)
    del store["a"]  # it expired during the outage; nobody took it
    r.leases.down = False
    await asyncio.sleep(2)
    renewing.cancel()
    assert store["a"] == value and "a" in r.runner.live
    r.runner.finish("a")
    await settle()
    assert len(r.results("a")) == 1 and store["a"] == f"done:{value}"


async def test_preflight_is_one_round_trip_per_store_for_a_fetched_batch() -> None:
    r = rig({"b": "w2/1"})  # "b" is another worker's
    r.ledger.terminal["c"] = Status.COMPLETED  # "c" is already done
    await r.deliver_batch([(f"{c}", i) for i, c in enumerate("abcdef")])
    assert r.ledger.reads == [list("abcdef")] and r.leases.round_trips == 1
    assert sorted(r.runner.submitted) == list("adef")
    assert r.worker._work["b"].state == "watching" and 2 in r.consumer.finished


@pytest.mark.parametrize("window", ["fetched", "waiting", "preflight", "admitted", "running"])
async def test_a_cancel_is_honoured_in_every_window(window: str) -> None:
    r = rig()
    r.worker._admission = KvAdmission(Capacity(10_000, 1))
    if window == "fetched":  # fetched, not yet triaged: only the flag can tell (no work is tracked yet)
        r.cancel("a")
        await r.deliver("a", 1)
    elif window == "waiting":
        await r.deliver("busy", 0)  # the one slot is taken: "a" waits for room
        await r.deliver("a", 1)
        assert r.worker._work["a"].state == "waiting"
    elif window in ("preflight", "admitted"):
        gate = asyncio.Event()
        real_facts, real_publish = r.ledger.dispatch_facts, r.worker._publish

        async def slow_facts(ids: list[str]) -> dict[str, DispatchFacts]:
            if window == "preflight":
                await gate.wait()
            return await real_facts(ids)

        async def slow_publish(outgoing: list[Any]) -> None:  # recording the attempt, before the engine
            if window == "admitted" and outgoing[0][0] == TOPICS.events:
                await gate.wait()
            await real_publish(outgoing)

        r.ledger.dispatch_facts = slow_facts  # type: ignore[method-assign]
        r.worker._publish = slow_publish  # type: ignore[method-assign]
        await r.deliver("a", 1)
        assert r.worker._work["a"].state == "admitted"
    else:
        await r.deliver("a", 1)
        assert r.runner.submitted == ["a"]
    if window != "fetched":
        r.cancel("a")
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


async def test_an_engine_failure_publishes_nothing_commits_nothing_past_held_work_and_stops_the_worker() -> None:
    r = rig()
    r.consumer.pending = [_raw("a", 0), _raw("b", 1)]
    running = asyncio.create_task(r.worker.run(asyncio.Event()))
    await asyncio.sleep(1)
    assert sorted(r.runner.submitted) == ["a", "b"]
    r.runner.fail("injected")
    await asyncio.wait_for(running, timeout=10)  # run() returns: the shell exits non-zero (runner.failure)
    assert r.results("a") == r.results("b") == []
    assert r.consumer.committed == 0, "offsets of work the failed engine held were committed"
    assert r.ledger.strikes == {"a": 1, "b": 1} and r.leases.store == {}, "not struck, or leases not released"


async def test_a_terminal_check_that_fails_is_never_read_as_not_terminal() -> None:
    r = rig()
    r.ledger.down = True
    r.consumer.pending = [_raw("a", 0)]
    stop = asyncio.Event()
    running = asyncio.create_task(r.worker.run(stop))
    await asyncio.sleep(60)  # several retries (backing off), each failing
    assert r.runner.submitted == [], "ran on a failed read of the store"
    assert r.worker._work["a"].state == "waiting" and len(r.ledger.reads) >= 4
    r.ledger.down = False
    await asyncio.sleep(40)  # the next retry reads it
    assert r.runner.submitted == ["a"]
    r.runner.finish("a")
    await asyncio.sleep(1)
    stop.set()
    await asyncio.wait_for(running, timeout=60)
    assert len(r.results("a")) == 1 and r.consumer.committed == 1


async def _redis_down(ids: list[str]) -> set[str]:
    raise SideChannelUnavailable("redis down")


async def test_drain_waits_for_the_generations_a_batch_in_preflight_starts() -> None:
    store: dict[str, str] = {}
    r = rig(store)
    gate = r.slow(r.ledger, "dispatch_facts")
    await r.deliver("a", 0)
    assert r.worker._work["a"].state == "admitted"
    renewing = asyncio.create_task(r.worker._renew_leases_forever())
    draining = asyncio.create_task(r.worker._drain(renewing))  # grace 30 s
    await asyncio.sleep(0.5)
    gate.set()  # preflight answers inside the grace period: "a" starts
    await asyncio.sleep(5)
    assert not draining.done() and "a" in r.runner.live and "a" in store, "lease given up under a generation"
    r.runner.finish("a")
    await asyncio.wait_for(draining, timeout=60)
    assert len(r.results("a")) == 1 and store["a"].startswith("done:")


async def test_drain_past_its_grace_stops_what_a_batch_started_and_releases_its_lease() -> None:
    store: dict[str, str] = {}
    r = rig(store)
    gate = r.slow(r.ledger, "dispatch_facts")
    await r.deliver("a", 0)
    renewing = asyncio.create_task(r.worker._renew_leases_forever())
    draining = asyncio.create_task(r.worker._drain(renewing))
    gate.set()
    await asyncio.wait_for(draining, timeout=60)  # "a" never finishes: cut off after the grace period
    assert "a" not in r.runner.live and "a" not in store and r.results("a") == []


async def test_a_cancel_recorded_in_the_ledger_is_honoured_when_the_flag_cannot_be_read() -> None:
    r = rig()
    r.ledger.cancelled.add("a")  # Redis was down when the client cancelled: the ledger has it
    r.cancels.flagged = _redis_down  # type: ignore[method-assign]
    await r.deliver("a", 0)
    assert r.runner.submitted == [] and r.results("a")[0].status is Status.CANCELLED


async def test_a_cancel_kept_through_watching_ends_the_takeover_cancelled() -> None:
    store = {"a": "w2/1"}  # another worker's attempt holds "a"
    r = rig(store)
    gate = r.slow(r.leases, "acquire_many")
    await r.deliver("a", 0)
    r.worker.cancel("a")  # the notification only (no flag, no ledger: both unreadable later)
    gate.set()
    await settle()
    assert r.worker._work["a"].state == "watching"
    del store["a"]  # w2 died before it saw the cancel; its lease expired
    r.cancels.flagged = _redis_down  # type: ignore[method-assign]
    await asyncio.sleep(2)
    r.worker._start_admitted()
    await settle()
    assert r.runner.submitted == [] and r.results("a")[0].status is Status.CANCELLED


async def test_one_request_the_store_cannot_read_holds_back_no_other_of_its_batch() -> None:
    r = rig()
    real = r.ledger.dispatch_facts

    async def facts(ids: list[str]) -> dict[str, DispatchFacts]:
        if "poison" in ids:  # not an outage: a row this worker cannot read
            raise ValueError("'rejected' is not a valid Status")
        return await real(ids)

    r.ledger.dispatch_facts = facts  # type: ignore[method-assign]
    await r.deliver_batch([("poison", 0)] + [(f"r{i}", i + 1) for i in range(5)])
    assert sorted(r.runner.submitted) == [f"r{i}" for i in range(5)]
    assert "poison" not in r.runner.submitted and r.worker._work["poison"].state == "waiting"


async def test_work_revoked_in_preflight_and_sent_back_to_waiting_is_dropped() -> None:
    r = rig()
    r.ledger.strikes["s"] = 1  # a suspect, found at preflight: the rest of its batch defers to it
    gate = r.slow(r.ledger, "dispatch_facts")
    await r.deliver_batch([("s", 0), ("a", 1)])
    r.worker.drop_revoked({TP})
    gate.set()
    await asyncio.sleep(1)
    assert "a" not in r.worker._work and "s" not in r.worker._work, "orphans with no offsets kept"
    assert r.runner.submitted == [] and r.worker._quarantine is None


@pytest.mark.parametrize("key", [b"ok-key", b"nul\x00key", b"k" * 600])
async def test_an_unreadable_record_is_dead_lettered_whatever_its_key(key: bytes) -> None:
    r = rig()
    raw = SimpleNamespace(topic=TP[0], partition=TP[1], offset=3, key=key,
                          value=b'{"request_id": "x", "model": "m", "input_ids": [1], "params": {"max_tokens": 1}, '
                                b'"session_id": "s\\u0000"}')
    await r.worker._triage(raw)
    await settle()
    assert [topic for topic, _key, _record in r.published][0] == TOPICS.dlq and 3 in r.consumer.finished
    assert len(r.published) == (2 if key == b"ok-key" else 1), "a failed result only under a key it can carry"


class StalledDeltas:
    """Redis's delta stream, whose first call stalls until ``gate`` opens (a slow round trip)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.sent: list[tuple[str, dict[str, str]]] = []
        self.calls = 0

    async def append_many(self, deltas: list[tuple[str, dict[str, str]]]) -> None:
        self.calls += 1
        if self.calls == 1:
            await self.gate.wait()
        self.sent.extend(deltas)


async def test_deltas_go_out_as_they_come_and_a_flush_in_flight_at_shutdown_is_never_cut_off() -> None:
    r = rig()
    deltas = StalledDeltas()
    r.worker._side.deltas = deltas
    stop = asyncio.Event()
    running = asyncio.create_task(r.worker.run(stop))
    await asyncio.sleep(0.1)
    r.worker._work["a"] = _Work(record=TokenizedRecord.model_validate_json(_raw("a", 0).value), lease="w1/x")
    r.worker._on_text("a", "one")
    await asyncio.sleep(0.05)
    assert deltas.calls == 1, "a waiting delta was not flushed at once"
    r.worker._on_text("a", " two")  # arrives while the first flush is in flight
    stop.set()
    asyncio.get_running_loop().call_later(0.3, deltas.gate.set)  # the slow round trip answers after the stop
    await asyncio.wait_for(running, timeout=10)
    assert deltas.sent == [("a", {"d": "one", "n": "1", "a": "w1/x"}), ("a", {"d": " two", "n": "2", "a": "w1/x"})], \
        "a delta was lost, misnumbered or reordered on the way out"
    assert r.worker._work["a"].chunk_ends == [3, 7]


class TwoTierConsumer(FakeConsumer):
    """Both tiers, a partition each: a fetch returns only what the resumed topics hold (as paused partitions
    are polled but not fetched)."""

    def __init__(self) -> None:
        super().__init__()
        self.tiers: dict[str, list[Any]] = {TOPICS.tokenized_interactive: [], TOPICS.tokenized_batch: []}
        self.resumed = set(self.tiers)

    def pause_all(self) -> None:
        self.resumed = set()

    def resume_only(self, topics: set[str]) -> None:
        self.resumed = set(topics)

    async def fetch(self, max_records: int, timeout_ms: int = 50) -> list[Any]:
        batch: list[Any] = []
        for topic, queue in self.tiers.items():
            if topic in self.resumed:
                taken = queue[:max_records - len(batch)]
                del queue[:len(taken)]
                batch += taken
        if not batch:
            await asyncio.sleep(timeout_ms / 1000)
        return batch


def _tiered(request_id: str, offset: int, priority: Priority) -> Any:
    record = TokenizedRecord(request_id=request_id, model="m", input_ids=[1, 2, 3], priority=priority,
                             params=GenerationParams(max_tokens=8))
    return SimpleNamespace(topic=TOPICS.tokenized(priority), partition=0, offset=offset, key=request_id.encode(),
                           value=record.model_dump_json().encode())


async def test_a_batch_backlog_leaves_interactive_slots_and_interactive_records_are_still_fetched() -> None:
    r = rig()
    consumer = TwoTierConsumer()
    r.worker._consumer = consumer
    r.worker._admission = KvAdmission(Capacity(10_000, 4, interactive_slots=1, interactive_kv_tokens=100))
    consumer.tiers[TOPICS.tokenized_batch] = [_tiered(f"b{i}", i, Priority.BATCH) for i in range(10)]
    stop = asyncio.Event()
    running = asyncio.create_task(r.worker.run(stop))
    await asyncio.sleep(1)
    assert sorted(r.runner.submitted) == ["b0", "b1", "b2"], "batch work took a slot kept for interactive"
    assert TOPICS.tokenized_batch not in consumer.resumed and TOPICS.tokenized_interactive in consumer.resumed
    consumer.tiers[TOPICS.tokenized_interactive].append(_tiered("i0", 0, Priority.INTERACTIVE))
    await asyncio.sleep(1)
    assert r.runner.submitted[-1] == "i0", "an interactive request waited behind the batch backlog"
    r.runner.finish("b0")
    await asyncio.sleep(1)
    assert r.runner.submitted[-1] == "b3"  # the batch backlog goes on as room frees
    stop.set()
    for request_id in list(r.runner.live):
        r.runner.finish(request_id)
    await asyncio.wait_for(running, timeout=30)
