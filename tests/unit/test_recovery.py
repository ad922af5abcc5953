"""``inferlog replay``'s planning (inferlog.recovery) over a fake ledger, submitter and log scan: which jobs
are re-published, which are reported, and what a new deadline changes. The real broker and Postgres path is
tests/faults/test_operator_replay.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from inferlog import recovery
from inferlog.errors import ConfigError, IdempotencyConflict
from inferlog.ledger import Claim, LedgerEntry, key_of
from inferlog.logscan import LoggedRecord
from inferlog.messages import GenerationParams, RequestRecord, Status, now
from inferlog.recovery import ReplayFilter, parse_time, replay


def record(rid: str, *, tenant: str | None = None, deadline_at: float | None = None) -> RequestRecord:
    return RequestRecord(request_id=rid, model="m", prompt=f"prompt {rid}", params=GenerationParams(max_tokens=4),
                         tenant=tenant, deadline_at=deadline_at)


def entry(r: RequestRecord, status: Status = Status.QUEUED, *, payload: bool = True,
          created_at: float = 100.0) -> LedgerEntry:
    """A ledger row; a first-sight row (no payload) keeps no tenant, as the result-store writes it."""
    return LedgerEntry(key_of(r), r.tenant if payload else None, status, status.is_terminal(),
                       r.model_dump_json(exclude_none=True) if payload else None, r.deadline_at, created_at)


class FakeLedger:
    def __init__(self, entries: list[LedgerEntry], conflicting: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self._entries = {e.request_id: e for e in entries}
        self._conflicting = conflicting
        self.claimed: list[str] = []

    async def entries(self, *, since: float | None = None, until: float | None = None,
                      keys: list[str] | None = None, **_: Any) -> list[LedgerEntry]:
        if keys is not None:
            return [self._entries[k] for k in keys if k in self._entries]
        return [e for e in self._entries.values()
                if (since is None or e.created_at >= since) and (until is None or e.created_at <= until)]

    async def claim_many(self, records: list[RequestRecord]) -> list[Claim | IdempotencyConflict]:
        self.claimed += [key_of(r) for r in records]
        return [IdempotencyConflict(key_of(r)) if key_of(r) in self._conflicting
                else Claim(key_of(r), created=True, status=Status.QUEUED) for r in records]


class FakeSubmitter:
    def __init__(self) -> None:
        self.published: list[RequestRecord] = []

    async def republish(self, records: list[RequestRecord]) -> int:
        self.published += records
        return len(records)


@pytest.fixture
def on_log(monkeypatch: pytest.MonkeyPatch) -> list[RequestRecord]:
    """The requests topic as the scan reads it: records appended here are on the log."""
    logged: list[RequestRecord] = []

    async def fake_scan(_bootstrap: str, topic: str, **_: Any) -> AsyncIterator[list[LoggedRecord]]:
        yield [LoggedRecord(topic, 0, i, 100_000 + i, key_of(r).encode(), r.model_dump_json().encode())
               for i, r in enumerate(logged)] + [LoggedRecord(topic, 0, 99, 100_500, b"x", b"\x00 not json")]

    monkeypatch.setattr(recovery, "scan", fake_scan)
    return logged


async def run(ledger: FakeLedger, selected: ReplayFilter | None = None, *,  # type: ignore[no-untyped-def]
               dry_run: bool = False):
    submitter = FakeSubmitter()
    report = await replay(ledger, submitter, "broker:9092", "requests",  # type: ignore[arg-type]
                          selected or ReplayFilter(), dry_run=dry_run)
    return report, submitter


async def test_only_open_jobs_with_something_to_publish_are_republished(on_log: list[RequestRecord]) -> None:
    done, open_, other_tenant = record("done"), record("open"), record("t-open", tenant="acme")
    first_sight, orphan, payloadless = record("first-sight"), record("orphan"), record("nothing")
    on_log += [done, open_, open_, first_sight, orphan]  # open_ twice: a produce that timed out and landed
    ledger = FakeLedger([entry(done, Status.COMPLETED), entry(open_), entry(other_tenant, Status.TOKENIZED),
                         entry(first_sight, Status.RECEIVED, payload=False),
                         entry(payloadless, Status.RECEIVED, payload=False)])
    report, submitter = await run(ledger, ReplayFilter(tenant=""))

    assert sorted(report.republished) == ["first-sight", "open", "orphan"]
    assert sorted(key_of(r) for r in submitter.published) == ["first-sight", "open", "orphan"]
    assert sorted(report.recovered_from_log) == sorted(ledger.claimed) == ["first-sight", "orphan"]
    assert report.already_terminal == ["done"] and report.skipped_tenant == ["acme/t-open"]
    assert report.missing_payload == ["nothing"], "a payload-less row with nothing on the log is reported, never guessed"
    assert report.log_records == 6 and report.earliest_on_log == 100.0


async def test_dry_run_claims_and_publishes_nothing(on_log: list[RequestRecord]) -> None:
    orphan, open_ = record("orphan"), record("open")
    on_log.append(orphan)
    ledger = FakeLedger([entry(open_)])
    report, submitter = await run(ledger, dry_run=True)
    assert sorted(report.republished) == ["open", "orphan"] and report.recovered_from_log == ["orphan"]
    assert report.not_on_log == ["open"]
    assert submitter.published == [] and ledger.claimed == []


async def test_a_conflicting_record_on_the_log_is_never_republished(on_log: list[RequestRecord]) -> None:
    orphan = record("orphan")
    on_log.append(orphan)
    report, submitter = await run(FakeLedger([], conflicting={"orphan"}))
    assert report.conflicts == ["orphan"] and report.republished == [] and submitter.published == []


async def test_passed_deadlines_end_expired_unless_extended(on_log: list[RequestRecord]) -> None:
    late, timely = record("late", deadline_at=now() - 60), record("timely", deadline_at=now() + 600)
    ledger = FakeLedger([entry(late), entry(timely)])
    report, submitter = await run(ledger)
    assert report.deadline_passed == ["late"] and report.deadline_extended == []
    assert {key_of(r): r.deadline_at for r in submitter.published} == {"late": late.deadline_at,
                                                                       "timely": timely.deadline_at}

    before = now()
    report, submitter = await run(ledger, ReplayFilter(extend_deadline_s=300))
    assert report.deadline_passed == [] and report.deadline_extended == ["late"]
    published = {key_of(r): r.deadline_at for r in submitter.published}
    assert published["timely"] == timely.deadline_at, "a deadline still ahead is kept"
    assert before + 300 <= (published["late"] or 0) <= now() + 300


async def test_status_filter(on_log: list[RequestRecord]) -> None:
    queued, running = record("q"), record("r")
    report, _ = await run(FakeLedger([entry(queued), entry(running, Status.RUNNING)]),
                          ReplayFilter(statuses=(Status.RUNNING,)))
    assert report.republished == ["r"] and report.skipped_status == ["q"]


@pytest.mark.parametrize("kwargs, message", [
    ({"since": 20.0, "until": 10.0}, "is after --until"),
    ({"statuses": (Status.COMPLETED,)}, "is terminal"),
    ({"extend_deadline_s": 0}, "positive"),
])
def test_bad_filters_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ReplayFilter(**kwargs)


def test_parse_time() -> None:
    assert parse_time("1796342400") == 1796342400.0
    assert parse_time("2026-12-03T00:00:00Z") == parse_time("2026-12-03T00:00:00") == 1796256000.0
    assert parse_time("2026-12-03T01:00:00+01:00") == 1796256000.0
    with pytest.raises(ConfigError, match="neither ISO-8601"):
        parse_time("yesterday")


async def test_a_job_claimed_outside_the_window_whose_record_is_in_it_is_replayed(on_log: list[RequestRecord]) -> None:
    """A record logged in the window but claimed later (a lagging tokenizer, or an earlier replay's own claim
    of an orphan whose produce then failed) is the window's job: it is never dropped uncounted."""
    late_claim, late_done = record("late-claim"), record("late-done")
    on_log += [late_claim, late_done]  # logged at 100 s
    ledger = FakeLedger([entry(late_claim, created_at=500.0), entry(late_done, Status.COMPLETED, created_at=500.0)])
    report, submitter = await run(ledger, ReplayFilter(since=50.0, until=200.0))
    assert report.republished == ["late-claim"] and [key_of(r) for r in submitter.published] == ["late-claim"]
    assert report.already_terminal == ["late-done"] and ledger.claimed == []


async def test_a_first_sight_rows_tenant_is_the_records(on_log: list[RequestRecord]) -> None:
    theirs, done_elsewhere = record("x", tenant="acme"), record("d", tenant="other")
    on_log.append(theirs)
    ledger = FakeLedger([entry(theirs, Status.RECEIVED, payload=False), entry(done_elsewhere, Status.COMPLETED)])
    report, submitter = await run(ledger, ReplayFilter(tenant="acme"))
    assert report.republished == ["acme/x"] and [r.tenant for r in submitter.published] == ["acme"]
    assert report.already_terminal == [], "another tenant's finished job is not this replay's count"
    assert report.skipped_tenant == ["other/d"]
    report, submitter = await run(ledger, ReplayFilter(tenant=""))
    assert report.republished == [] and report.skipped_tenant == ["acme/x", "other/d"]


async def test_a_payload_that_no_longer_reads_is_reported_not_fatal(on_log: list[RequestRecord]) -> None:
    good = record("good")
    broken = LedgerEntry("old/id/with/slashes", None, Status.QUEUED, False, '{"schema_version": 1}', None, 100.0)
    report, submitter = await run(FakeLedger([entry(good), broken]))
    assert report.republished == ["good"] and report.missing_payload == ["old/id/with/slashes"]


async def test_refused_claims_leave_every_list(on_log: list[RequestRecord]) -> None:
    orphan = record("orphan", deadline_at=now() - 60)
    on_log.append(orphan)
    report, _ = await run(FakeLedger([], conflicting={"orphan"}))
    assert report.conflicts == ["orphan"]
    assert report.republished == report.deadline_passed == report.recovered_from_log == []


@pytest.mark.parametrize("text", ["nan", "inf", "-5", "1796342400000", "1e300"])
def test_times_out_of_range_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="between 1970 and 2100"):
        parse_time(text)


@pytest.mark.parametrize("seconds", [float("nan"), float("inf"), 8 * 24 * 3600.0])
def test_unbounded_deadline_extensions_are_refused(seconds: float) -> None:
    with pytest.raises(ConfigError, match="at most 7 days"):
        ReplayFilter(extend_deadline_s=seconds)


class EpochLedger(FakeLedger):
    def __init__(self, entries: list[LedgerEntry]) -> None:
        super().__init__(entries)

    async def entries(self, *, open_only: bool = False, **_: Any) -> list[LedgerEntry]:  # type: ignore[override]
        return [e for e in self._entries.values() if not (open_only and e.terminal)]


class EpochSubmitter(FakeSubmitter):
    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[str | None] = []

    async def republish(self, records: list[RequestRecord], *, epoch: str | None = None, **_: Any) -> int:
        self.epochs.append(epoch)
        return await super().republish(records)

    async def publish_results(self, results: list[Any]) -> None:
        self.ended = [(r.request_id, r.status, r.error.code) for r in results]


async def test_redrive_publishes_every_open_job_into_the_epoch_once() -> None:
    from dataclasses import replace

    open_, late, first_sight = record("open"), record("late", deadline_at=now() - 5), record("fs")
    again, newer = record("again"), record("newer")
    ledger = EpochLedger([entry(open_), entry(late, Status.TOKENIZED), entry(record("done"), Status.COMPLETED),
                          entry(first_sight, Status.RECEIVED, payload=False),
                          replace(entry(again), redriven_epoch="e1"), entry(newer, created_at=200.0)])
    submitter = EpochSubmitter()
    report = await recovery.redrive(ledger, submitter, "e1", 150.0)  # type: ignore[arg-type]
    assert sorted(report.redriven) == ["late", "open"] and report.deadline_passed == ["late"]
    assert report.already_redriven == ["again"], "re-driven into this epoch before: not published again"
    assert report.this_epoch == 1, "claimed since the epoch began: on its log, left alone"
    assert report.missing_payload == ["fs"], "a first-sight row is listed, never guessed"
    assert submitter.ended == [("fs", Status.FAILED, "payload_lost")], "and ended, never left open"
    assert sorted(key_of(r) for r in submitter.published) == ["late", "open"] and submitter.epochs == ["e1"]

    submitter = EpochSubmitter()
    report = await recovery.redrive(ledger, submitter, "e2", 250.0, extend_deadline_s=60)  # type: ignore[arg-type]
    assert sorted(report.redriven) == ["again", "late", "newer", "open"] and report.deadline_extended == ["late"]
    assert {key_of(r): (r.deadline_at or 0) > now() for r in submitter.published}["late"]

    dry = EpochSubmitter()
    report = await recovery.redrive(ledger, dry, "e3", 250.0, dry_run=True)  # type: ignore[arg-type]
    assert len(report.redriven) == 4 and dry.published == [] and not hasattr(dry, "ended")
