"""Operators' recovery: putting accepted jobs that have no terminal result back on the log.

``replay`` works a time window: the ledger (the source of truth for what was accepted) says which jobs were
claimed then and which of them are still open; a scan of the requests topic over the same window
cross-checks it (how many of them the log still holds) and recovers what the ledger cannot re-publish: a
record on the log whose ID has no row, or only the payload-less row the result-store made on first sight.
Every count is by job key, never by record (a produce that timed out can put one job on the log twice).

Nothing here generates or changes a stored result: a re-published job goes through the tokenizer and the
workers like any other, whose terminal checks and leases make a job already done or in progress cost
nothing. Jobs whose deadline passed are re-published with it (the tokenizer ends them ``expired``, DESIGN.md
contract 9) unless the operator gives them a new one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import ValidationError

from inferlog.errors import ConfigError, IdempotencyConflict
from inferlog.ledger import LedgerEntry, RequestLedger, key_of
from inferlog.logscan import scan
from inferlog.messages import RequestRecord, Status, ended, now
from inferlog.publishing import Submitter

log = logging.getLogger(__name__)

OPEN_STATUSES = (Status.RECEIVED, Status.QUEUED, Status.TOKENIZED, Status.RUNNING)

SCAN_GRACE_S = 15.0
"""A job is claimed before its record is produced (by at most the produce timeout, then the outbox relay):
the log is scanned this much past the window's end so a job claimed at its very end is still found there."""

MAX_EXTENSION_S = 7 * 24 * 3600.0
"""The longest new deadline (the gateway's own limit for ``deadline_s``)."""

Progress = Callable[[str, int, int | None], None]
"""Told (phase, how many more done, the phase's total if known) as the work advances: the CLI draws its
progress bar from it."""


LATEST_UNIX_S = 4_102_444_800.0
"""2100-01-01: a larger number of "seconds" is milliseconds or a typo, never a time to replay."""


def parse_time(text: str) -> float:
    """Unix seconds from ISO-8601 (a time without an offset is UTC) or a number of Unix seconds."""
    try:
        at = float(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(f"{text!r} is neither ISO-8601 (2026-12-03T10:00:00Z) nor Unix seconds") from None
        at = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(at) or not 0 <= at <= LATEST_UNIX_S:
        raise ConfigError(f"{text!r} is not a time between 1970 and 2100 in Unix seconds "
                          "(milliseconds? divide by 1000)")
    return at


def check_extension(seconds: float | None) -> None:
    if seconds is not None and not 0 < seconds <= MAX_EXTENSION_S:
        raise ConfigError("--extend-deadline must be a positive number of seconds, at most 7 days")


@dataclass(frozen=True)
class ReplayFilter:
    since: float | None = None
    until: float | None = None
    tenant: str | None = None
    """Only this tenant's jobs ("" is the default tenant); None: every tenant's."""
    statuses: tuple[Status, ...] = OPEN_STATUSES
    extend_deadline_s: float | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ConfigError(f"--since ({_iso(self.since)}) is after --until ({_iso(self.until)})")
        check_extension(self.extend_deadline_s)
        closed = [s.value for s in self.statuses if s.is_terminal()]
        if closed:
            raise ConfigError(f"--status {closed[0]} is terminal: a job with a result is never re-published")

    def wants_tenant(self, tenant: str | None) -> bool:
        return self.tenant is None or (tenant or "") == self.tenant


@dataclass
class ReplayReport:
    """What a replay found and did, each list of job keys."""

    filter: ReplayFilter
    dry_run: bool
    republished: list[str] = field(default_factory=list)
    """Re-published (or, in a dry run, to be): open jobs of the window and filter."""
    recovered_from_log: list[str] = field(default_factory=list)
    """Among ``republished``: claimed from their record on the log (no ledger payload)."""
    already_terminal: list[str] = field(default_factory=list)
    missing_payload: list[str] = field(default_factory=list)
    """Open, with no readable payload in the ledger and no record on the log: nothing to re-publish (never
    guessed)."""
    skipped_tenant: list[str] = field(default_factory=list)
    skipped_status: list[str] = field(default_factory=list)
    deadline_passed: list[str] = field(default_factory=list)
    """Among ``republished``: their deadline had passed; without --extend-deadline they end ``expired``."""
    deadline_extended: list[str] = field(default_factory=list)
    not_on_log: list[str] = field(default_factory=list)
    """Among ``republished``: the requests topic no longer holds their record in the window (a broker that
    lost its log, retention)."""
    conflicts: list[str] = field(default_factory=list)
    """Records on the log whose ID the ledger holds with another payload: never re-published."""
    log_records: int = 0
    """Records of the requests topic in the scanned window (several may be one job)."""
    earliest_on_log: float | None = None
    """The oldest record timestamp the scan saw (Unix seconds): the log holds nothing older."""

    def counts(self) -> dict[str, int]:
        return {
            "re-published" if not self.dry_run else "to re-publish": len(self.republished),
            "  of them recovered from the log": len(self.recovered_from_log),
            "  of them past their deadline (end expired)": len(self.deadline_passed),
            "  of them given a new deadline": len(self.deadline_extended),
            "  of them no longer on the log": len(self.not_on_log),
            "already terminal": len(self.already_terminal),
            "missing payload (not re-publishable)": len(self.missing_payload),
            "skipped by tenant": len(self.skipped_tenant),
            "skipped by status": len(self.skipped_status),
            "conflicting record on the log": len(self.conflicts),
        }

    def to_json(self) -> dict[str, object]:
        f = self.filter
        return {
            "dry_run": self.dry_run,
            "window": {"since": f.since, "until": f.until, "tenant": f.tenant,
                       "statuses": [s.value for s in f.statuses], "extend_deadline_s": f.extend_deadline_s},
            "republished": self.republished, "recovered_from_log": self.recovered_from_log,
            "already_terminal": len(self.already_terminal), "missing_payload": self.missing_payload,
            "skipped_tenant": len(self.skipped_tenant), "skipped_status": len(self.skipped_status),
            "deadline_passed": self.deadline_passed, "deadline_extended": self.deadline_extended,
            "not_on_log": self.not_on_log, "conflicts": self.conflicts, "log_records": self.log_records,
            "earliest_on_log": self.earliest_on_log,
        }


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def replay(ledger: RequestLedger, submitter: Submitter, bootstrap: str, requests_topic: str,
                 selected: ReplayFilter, *, dry_run: bool, progress: Progress | None = None) -> ReplayReport:
    """Re-publish the open jobs claimed in the window (see the module's docstring)."""
    tell = progress or (lambda _phase, _n, _total: None)
    report = ReplayReport(selected, dry_run)
    on_log = await _scan_window(bootstrap, requests_topic, selected, report, tell)
    entries = {e.request_id: e for e in await ledger.entries(since=selected.since, until=selected.until)}
    # Records on the log in the window whose jobs the window's ledger rows do not cover: the ledger knows
    # them from another claim time (a lagging tokenizer, a replay's own claim of an earlier run), only by a
    # payload-less first-sight row, or not at all. A record in the window makes them this window's jobs.
    unknown = [k for k, (_record, at) in on_log.items() if k not in entries and _in_window(at, selected)]
    elsewhere = {e.request_id: e for e in await ledger.entries(keys=unknown)} if unknown else {}
    at = now()
    to_publish: list[RequestRecord] = []
    to_claim: list[RequestRecord] = []
    for key in [*entries, *unknown]:
        entry = entries.get(key) or elsewhere.get(key)
        logged = on_log.get(key)
        record = _record_of(entry, logged[0] if logged else None)
        if entry is not None and entry.payload is not None:
            tenant = entry.tenant
        else:  # a first-sight row keeps no tenant: the record says whose job it is
            tenant = record.tenant if record is not None else entry.tenant if entry is not None else None
        if not selected.wants_tenant(tenant):
            report.skipped_tenant.append(key)
        elif entry is not None and entry.terminal:
            report.already_terminal.append(key)
        elif (entry.status if entry is not None else Status.RECEIVED) not in selected.statuses:
            report.skipped_status.append(key)
        elif record is None:
            report.missing_payload.append(key)
        else:
            if entry is None or entry.payload is None:
                to_claim.append(record)
            to_publish.append(_deadline_for(record, selected, at, report))
            report.republished.append(key)
            if logged is None:
                report.not_on_log.append(key)
        tell("planning", 1, len(entries) + len(unknown))
    if dry_run:
        report.recovered_from_log = [key_of(r) for r in to_claim]
        return report
    if to_claim:
        outcomes = await ledger.claim_many(to_claim)
        refused = {key_of(r) for r, o in zip(to_claim, outcomes, strict=True) if isinstance(o, IdempotencyConflict)}
        report.conflicts += sorted(refused)
        for listed in ("republished", "deadline_passed", "deadline_extended", "not_on_log"):
            setattr(report, listed, [k for k in getattr(report, listed) if k not in refused])
        to_publish = [r for r in to_publish if key_of(r) not in refused]
        report.recovered_from_log = [key_of(r) for r in to_claim if key_of(r) not in refused]
    for start in range(0, len(to_publish), 500):
        part = to_publish[start:start + 500]
        await submitter.republish(part)
        tell("re-publishing", len(part), len(to_publish))
    return report


def _in_window(at_ms: int, selected: ReplayFilter) -> bool:
    at = at_ms / 1000
    return (selected.since is None or at >= selected.since) and (selected.until is None or at <= selected.until)


async def _scan_window(bootstrap: str, topic: str, selected: ReplayFilter, report: ReplayReport,
                       tell: Progress) -> dict[str, tuple[RequestRecord, int]]:
    """Each job on the requests topic in the window (plus the scan's grace): its first readable record and
    that record's timestamp."""
    since_ms = None if selected.since is None else int(selected.since * 1000)
    until_ms = None if selected.until is None else int((selected.until + SCAN_GRACE_S) * 1000)
    found: dict[str, tuple[RequestRecord, int]] = {}
    async for batch in scan(bootstrap, topic, since_ms=since_ms, until_ms=until_ms):
        for logged in batch:
            report.log_records += 1
            seen = logged.timestamp_ms / 1000
            report.earliest_on_log = seen if report.earliest_on_log is None else min(report.earliest_on_log, seen)
            try:
                record = RequestRecord.model_validate_json(logged.value or b"")
            except (ValidationError, ValueError):
                continue  # a broken record: the tokenizer dead-lettered it (`inferlog dlq`)
            found.setdefault(key_of(record), (record, logged.timestamp_ms))
        tell(f"scanning {topic}", len(batch), None)
    return found


def _record_of(entry: LedgerEntry | None, logged: RequestRecord | None) -> RequestRecord | None:
    """The job's record: the ledger's payload (what was accepted), else the one on the log."""
    if entry is not None and entry.payload is not None:
        try:
            return RequestRecord.model_validate(json.loads(entry.payload))
        except (ValidationError, ValueError):  # claimed under an older schema: reported, never guessed
            log.warning("the ledger's payload of %s no longer reads as a request record", entry.request_id)
            return None
    return logged


def _deadline_for(record: RequestRecord, selected: ReplayFilter, at: float, report: ReplayReport) -> RequestRecord:
    record, change = _with_deadline(record, selected.extend_deadline_s, at)
    if change is not None:
        (report.deadline_extended if change == "extended" else report.deadline_passed).append(key_of(record))
    return record


def _with_deadline(record: RequestRecord, extend_s: float | None, at: float) -> tuple[RequestRecord, str | None]:
    """The record to re-publish and what happened to its deadline: None (none, or still ahead), "passed"
    (kept: the job ends expired) or "extended" (a new one, ``extend_s`` from ``at``)."""
    if record.deadline_at is None or record.deadline_at > at:
        return record, None
    if extend_s is None:
        return record, "passed"
    return record.model_copy(update={"deadline_at": at + extend_s}), "extended"


@dataclass
class RedriveReport:
    """What a re-drive found and did, each list of job keys."""

    epoch: str
    dry_run: bool
    redriven: list[str] = field(default_factory=list)
    """Re-published into ``epoch`` (or, in a dry run, to be): every open job with a payload."""
    deadline_passed: list[str] = field(default_factory=list)
    """Among ``redriven``: their deadline had passed; without --extend-deadline they end ``expired``."""
    deadline_extended: list[str] = field(default_factory=list)
    already_redriven: list[str] = field(default_factory=list)
    """Open, and already re-driven into this epoch by an earlier run: not published again."""
    missing_payload: list[str] = field(default_factory=list)
    """Open, with no payload to re-drive from (a first-sight row of an ID never claimed, or one that no
    longer reads as a request): never guessed; a re-drive ends each ``failed`` (``payload_lost``), since no
    record of it is left anywhere to run."""
    this_epoch: int = 0
    """Open jobs claimed since the epoch began: on its log already (or in the outbox), not re-driven."""

    def counts(self) -> dict[str, int]:
        return {
            "re-driven" if not self.dry_run else "to re-drive": len(self.redriven),
            "  of them past their deadline (end expired)": len(self.deadline_passed),
            "  of them given a new deadline": len(self.deadline_extended),
            "already re-driven into this epoch": len(self.already_redriven),
            ("missing payload (to end failed)" if self.dry_run else "missing payload (ended failed)"):
                len(self.missing_payload),
            "claimed in this epoch (on its log: left alone)": self.this_epoch,
        }

    def to_json(self) -> dict[str, object]:
        return {"epoch": self.epoch, "dry_run": self.dry_run, "redriven": self.redriven,
                "deadline_passed": self.deadline_passed, "deadline_extended": self.deadline_extended,
                "already_redriven": self.already_redriven, "missing_payload": self.missing_payload,
                "this_epoch": self.this_epoch}


async def redrive(ledger: RequestLedger, submitter: Submitter, epoch: str, epoch_started_at: float, *,
                  extend_deadline_s: float | None = None, dry_run: bool = False,
                  progress: Progress | None = None) -> RedriveReport:
    """Put every job accepted before broker epoch ``epoch`` began (``epoch_started_at``: its marker's time)
    and without a terminal result back on that epoch's log, from its ledger payload (the broker lost its
    log: there is nothing to cross-check against). A job re-driven into this epoch before is skipped, so a
    second run publishes nothing new; a job claimed since the epoch began is on its log already. One with
    no payload ends ``failed``. Nothing here generates or changes a result (the workers' terminal checks
    and leases make a job already done cost nothing)."""
    check_extension(extend_deadline_s)
    tell = progress or (lambda _phase, _n, _total: None)
    report = RedriveReport(epoch, dry_run)
    entries = await ledger.entries(open_only=True)
    at = now()
    to_publish: list[RequestRecord] = []
    for entry in entries:
        record = _record_of(entry, None)
        if entry.created_at >= epoch_started_at:
            report.this_epoch += 1
        elif entry.redriven_epoch == epoch:
            report.already_redriven.append(entry.request_id)
        elif record is None:
            report.missing_payload.append(entry.request_id)
        else:
            record, change = _with_deadline(record, extend_deadline_s, at)
            if change is not None:
                (report.deadline_extended if change == "extended" else report.deadline_passed).append(key_of(record))
            to_publish.append(record)
            report.redriven.append(entry.request_id)
        tell("planning", 1, len(entries))
    if dry_run:
        return report
    for start in range(0, len(to_publish), 500):
        part = to_publish[start:start + 500]
        await submitter.republish(part, epoch=epoch)
        tell("re-driving", len(part), len(to_publish))
    if report.missing_payload:
        await submitter.publish_results([ended(
            key, Status.FAILED, code="payload_lost", error_type="server_error",
            message=f"The request's record was lost with an earlier broker log (before epoch {epoch}) and the "
                    "ledger holds no payload to run it from; submit it again.") for key in report.missing_payload])
    return report
