"""The dead-letter queue as operators work it: ``inferlog dlq list|show|redrive``.

A dead letter is a record a stage set aside because it could never succeed (DESIGN.md: poison-proof
consumers): unreadable, refused, or in the engine each time it failed. Once its cause is fixed (a bad
deploy rolled back, a model added, a client's ID collision understood) an operator re-drives it. The job
it stood for usually has a terminal result already (its ``failed`` stand-in), and the first terminal result
wins for good, so a re-drive never reopens that job: it makes a new one, whose client ID is derived from the
original's (``<id>.redrive-<n>``), in the same tenant, linked both ways in the ledger (each poll shows the
link). The record to re-drive is:

- for a record of the requests topic, the dead letter's own copy of it, or, when that copy was cut short
  (``truncated``), the source record read back from its offset (checked against the stored SHA-256) while
  the log still holds it;
- for any later stage (tokenized, results, events), the job's payload in the ledger (what was accepted).

What cannot be re-driven is listed with why, never guessed: a record that still does not read as a request,
a truncated one whose source is gone, a job with no stored payload, a job the dead letter did not end (still
open: ``inferlog replay`` is for that; or ended other than ``failed``: nothing to run again). A re-driven job
that fails again is dead-lettered once more like any record, and never re-driven automatically again ("failed
again"): no loop. Dead letters are named by identity (stage, source position, source value's hash), so two
copies of one are one; and one job re-drives once, whatever number of dead letters it left (two copies of its
record on the requests topic, or refusals at two stages, with the same payload): re-running a re-drive never
makes a second job.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import ValidationError

from inferlog.errors import ConfigError
from inferlog.identity import client_id_of
from inferlog.ledger import LedgerEntry, RequestLedger, key_of, payload_hash
from inferlog.logscan import read_all, read_at
from inferlog.messages import DeadLetter, RequestRecord, Status, Timings, now
from inferlog.publishing import Submitter
from inferlog.recovery import Progress, check_extension
from inferlog.topics import Topics

log = logging.getLogger(__name__)

VALUE_PREVIEW_CHARS = 2_000
"""How much of a dead letter's value ``dlq show`` prints (``--json`` gives what the dead letter holds)."""


def identity_of(dead: DeadLetter) -> str:
    """A dead letter's name across copies: the stage that refused it, where the refused record was, and its
    bytes' hash (a stage that retried a batch may have dead-lettered one record twice)."""
    parts = [dead.stage, dead.topic, str(dead.partition), str(dead.offset),
             dead.value_sha256 or hashlib.sha256(dead.value.encode("utf-8", "surrogatepass")).hexdigest()]
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def parse_position(text: str) -> tuple[int, int]:
    """A dead letter's place on the DLQ as operators type it: ``<partition>:<offset>``, or ``<offset>``."""
    partition, _, offset = text.rpartition(":")
    try:
        at = (int(partition) if partition else 0, int(offset))
    except ValueError:
        raise ConfigError(f"{text!r} is not a dead letter's position (<partition>:<offset>, as `dlq list` "
                          "prints it)") from None
    if at[0] < 0 or at[1] < 0:
        raise ConfigError(f"{text!r} is not a dead letter's position: both numbers are 0 or more")
    return at


@dataclass(frozen=True)
class Letter:
    """One dead letter as read from the DLQ (its first copy)."""

    partition: int
    offset: int
    dead: DeadLetter
    identity: str
    copies: int = 1
    copies_at: tuple[tuple[int, int], ...] = ()
    """Where the later copies are on the DLQ."""

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"


@dataclass(frozen=True)
class LetterFilter:
    stage: str | None = None
    reason: str | None = None
    """A case-insensitive part of the dead letter's error."""
    since: float | None = None
    """Dead-lettered at or after (Unix seconds)."""

    def matches(self, letter: Letter) -> bool:
        dead = letter.dead
        return ((self.stage is None or dead.stage == self.stage)
                and (self.reason is None or self.reason.casefold() in dead.error.casefold())
                and (self.since is None or dead.at >= self.since))


@dataclass
class Dlq:
    """The DLQ read to its high-water mark: its dead letters (each once, oldest first) and the positions of
    records on it that do not read as dead letters."""

    letters: list[Letter] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    records: int = 0

    def find(self, partition: int, offset: int) -> Letter | None:
        """The dead letter at that position (or the one it is a copy of)."""
        for letter in self.letters:
            if (letter.partition, letter.offset) == (partition, offset) or (partition, offset) in letter.copies_at:
                return letter
        return None


async def read_dlq(bootstrap: str, topic: str, *, progress: Progress | None = None) -> Dlq:
    tell = progress or (lambda _phase, _n, _total: None)
    out = Dlq()
    first: dict[str, int] = {}
    for logged in await read_all(bootstrap, topic):
        out.records += 1
        try:
            dead = DeadLetter.model_validate_json(logged.value or b"")
        except (ValidationError, ValueError):
            out.unreadable.append(f"{logged.partition}:{logged.offset}")
            continue
        identity = identity_of(dead)
        if identity in first:
            index = first[identity]
            copy = out.letters[index]
            out.letters[index] = Letter(copy.partition, copy.offset, copy.dead, identity, copy.copies + 1,
                                        (*copy.copies_at, (logged.partition, logged.offset)))
        else:
            first[identity] = len(out.letters)
            out.letters.append(Letter(logged.partition, logged.offset, dead, identity))
        tell(f"reading {topic}", 1, None)
    return out


REDRIVABLE, REDRIVEN, FAILED_AGAIN, NOT_REDRIVABLE = "re-drivable", "re-driven", "failed again", "not re-drivable"


@dataclass
class Verdict:
    """What a re-drive would do with one dead letter."""

    letter: Letter
    state: str
    """REDRIVABLE, REDRIVEN (as ``detail``), FAILED_AGAIN (a re-drive of ``detail``) or NOT_REDRIVABLE (why)."""
    detail: str = ""
    record: RequestRecord | None = None
    """REDRIVABLE: the original's record, to be re-driven under a derived ID."""
    same_as: Letter | None = None
    """REDRIVABLE: an earlier dead letter of the same job and payload, re-driven as one job with it."""

    @property
    def original_key(self) -> str | None:
        return key_of(self.record) if self.record is not None else self.letter.dead.request_id

    def to_json(self) -> dict[str, object]:
        dead = self.letter.dead
        return {"position": self.letter.position, "identity": self.letter.identity, "copies": self.letter.copies,
                "at": dead.at, "stage": dead.stage, "error": dead.error, "request_id": dead.request_id,
                "source": {"topic": dead.topic, "partition": dead.partition, "offset": dead.offset},
                "value_bytes": dead.value_bytes, "value_sha256": dead.value_sha256, "truncated": dead.truncated,
                "state": self.state, "detail": self.detail,
                "same_job_as": self.same_as.position if self.same_as is not None else None}


def _job_key(letter: Letter) -> str | None:
    """The job key a dead letter names, if it can be one: a key with NUL in it (a direct producer's record)
    names no job, and must never reach a query (Postgres text refuses NUL for every key in the list)."""
    key = letter.dead.request_id
    return key if key and "\x00" not in key else None


async def assess(ledger: RequestLedger, bootstrap: str, topics: Topics, letters: list[Letter]) -> list[Verdict]:
    """Each dead letter's verdict (reads the ledger, and the log for truncated records; changes nothing)."""
    reserved = await ledger.redrives([letter.identity for letter in letters])
    # A reservation whose job was never claimed or published (a re-drive that stopped between the two) is
    # finished by this one, under the same key.
    published = await _on_log(ledger, reserved.values())
    done = {identity: key for identity, key in reserved.items() if key in published}
    keys = sorted({key for letter in letters if (key := _job_key(letter))})
    origins = await ledger.redrive_origins(keys) if keys else {}
    later = sorted({key for lt in letters if (key := _job_key(lt)) and lt.dead.topic != topics.requests})
    payloads = {e.request_id: e.payload for e in await ledger.entries(keys=later)} if later else {}
    verdicts = []
    for letter in letters:
        dead = letter.dead
        if letter.identity in done:
            verdicts.append(Verdict(letter, REDRIVEN, done[letter.identity]))
        elif dead.request_id is not None and dead.request_id in origins:
            verdicts.append(Verdict(letter, FAILED_AGAIN, origins[dead.request_id]))
        elif dead.topic == topics.requests:
            verdicts.append(await _from_source(bootstrap, letter))
        elif _job_key(letter) is None and dead.request_id:
            verdicts.append(Verdict(letter, NOT_REDRIVABLE, "its key is not a job's (it holds NUL)"))
        else:
            verdicts.append(_from_ledger(letter, payloads.get(dead.request_id or "")))
    return await _one_per_job(ledger, verdicts, topics)


async def _one_per_job(ledger: RequestLedger, verdicts: list[Verdict], topics: Topics) -> list[Verdict]:
    """Re-drivable only what a re-drive is for, once per job and payload:

    - a dead letter that is the job it names (any later stage's, or a requests-topic record with the job's
      payload) re-drives only a job that ended ``failed``: one still open was not ended by it (``inferlog
      replay`` re-publishes an open job; a re-drive would run it twice), and one that ended otherwise has
      nothing to run again. A requests-topic record with another payload (an ID reused) is a request that
      never became a job: re-drivable whatever became of the job that holds its ID;
    - dead letters of one job with one payload are one re-drive: the first is re-driven, the others are the
      same job (``same_as``); one whose job and payload an earlier run re-drove (and published) is that
    re-drive."""
    originals = sorted({key_of(v.record) for v in verdicts if v.state == REDRIVABLE and v.record is not None})
    if not originals:
        return verdicts
    jobs = {e.request_id: e for e in await ledger.entries(keys=originals)}
    earlier = await ledger.redrives_of(originals)
    on_log = await _on_log(ledger, earlier.values())
    first: dict[tuple[str, str], Letter] = {}
    out = []
    for v in verdicts:
        if v.state != REDRIVABLE or v.record is None:
            out.append(v)
            continue
        key, digest = key_of(v.record), payload_hash(v.record)
        why = _not_for_redrive(jobs.get(key), digest, is_the_job=v.letter.dead.topic != topics.requests)
        if why is not None:
            out.append(Verdict(v.letter, NOT_REDRIVABLE, why))
        elif earlier.get((key, digest)) in on_log:
            out.append(Verdict(v.letter, REDRIVEN, earlier[(key, digest)]))
        elif (key, digest) in first:
            out.append(Verdict(v.letter, REDRIVABLE, record=v.record, same_as=first[(key, digest)]))
        else:
            first[(key, digest)] = v.letter
            out.append(v)
    return out


async def _on_log(ledger: RequestLedger, keys: Iterable[str]) -> set[str]:
    """Which of these (re-drive) job keys were claimed and published: past ``received``."""
    wanted = sorted(set(keys))
    return {v.request_id for v in await ledger.get_many(wanted) if v.status is not Status.RECEIVED} if wanted else set()


def _not_for_redrive(job: LedgerEntry | None, digest: str, *, is_the_job: bool) -> str | None:
    """Why a dead letter's record must not become a new job, given the job its ID names (None: it may)."""
    if job is None or not (is_the_job or _digest_of(job) == digest):
        return None  # never a job, or another payload under a taken ID: a request of its own
    if not job.terminal:
        return (f"job {job.request_id} is still {job.status.value}: no failed result of it is stored (yet); a "
                "re-drive would run it beside itself (if it stays open, `inferlog replay` re-publishes it)")
    if job.status is not Status.FAILED:
        return f"job {job.request_id} ended {job.status.value}: nothing to run again"
    return None


def _digest_of(job: LedgerEntry) -> str | None:
    """The payload hash the job was claimed with (recomputed only for a row that predates the column)."""
    if job.payload_hash is not None:
        return job.payload_hash
    try:
        return payload_hash(RequestRecord.model_validate(json.loads(job.payload))) if job.payload else None
    except (ValidationError, ValueError):
        return None


async def _from_source(bootstrap: str, letter: Letter) -> Verdict:
    dead = letter.dead
    raw: bytes | str = dead.value
    # The copy is the record only if it holds its bytes: cut short, or with invalid UTF-8 replaced (a prompt
    # the producer never sent), the source record is read back instead, while the log holds it.
    whole = not dead.truncated and (dead.value_sha256 is None or hashlib.sha256(
        dead.value.encode("utf-8", "surrogatepass")).hexdigest() == dead.value_sha256)
    if not whole:
        source = await read_at(bootstrap, dead.topic, dead.partition, dead.offset)
        if source is None or source.value is None or hashlib.sha256(source.value).hexdigest() != dead.value_sha256:
            altered = "was cut short" if dead.truncated else "is not the record's bytes (invalid UTF-8 replaced)"
            return Verdict(letter, NOT_REDRIVABLE, f"its value {altered} and the source record is no longer "
                           f"on the log ({dead.topic}[{dead.partition}]@{dead.offset})")
        raw = source.value
    try:
        record = RequestRecord.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "the record"
        return Verdict(letter, NOT_REDRIVABLE, f"it still does not read as a request: {where}: {first.get('msg')}")
    except ValueError as exc:
        return Verdict(letter, NOT_REDRIVABLE, f"it still does not read as a request: {exc}")
    return Verdict(letter, REDRIVABLE, record=record)


def _from_ledger(letter: Letter, payload: str | None) -> Verdict:
    key = letter.dead.request_id
    if key is None:
        return Verdict(letter, NOT_REDRIVABLE, "it names no job, and only a requests-topic record is re-driven "
                       "from its own value")
    if payload is None:
        return Verdict(letter, NOT_REDRIVABLE, f"the ledger holds no payload for job {key}")
    try:
        return Verdict(letter, REDRIVABLE, record=RequestRecord.model_validate(json.loads(payload)))
    except (ValidationError, ValueError):
        return Verdict(letter, NOT_REDRIVABLE, f"the ledger's payload of job {key} no longer reads as a request")


@dataclass
class DlqRedriveReport:
    dry_run: bool
    redriven: list[tuple[str, str, str]] = field(default_factory=list)
    """(dead letter's position, original job key, new job key) for each re-driven (or, dry, to be: the new
    key is then only a preview)."""
    deadline_passed: list[str] = field(default_factory=list)
    """New job keys whose original deadline had passed: without --extend-deadline they end ``expired``."""
    already_redriven: list[tuple[str, str]] = field(default_factory=list)
    redriven_with: list[tuple[str, str, str]] = field(default_factory=list)
    """(dead letter's position, the position of the one of the same job and payload it was re-driven with,
    the new job key ("(new)" in a dry run))."""
    failed_again: list[tuple[str, str]] = field(default_factory=list)
    not_redrivable: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "re-driven as new jobs" if not self.dry_run else "to re-drive": len(self.redriven),
            "  of them past their deadline (end expired)": len(self.deadline_passed),
            "already re-driven": len(self.already_redriven),
            "re-driven with another dead letter of the same job": len(self.redriven_with),
            "failed again after a re-drive (not re-driven again)": len(self.failed_again),
            "not re-drivable": len(self.not_redrivable),
        }

    def to_json(self) -> dict[str, object]:
        return {"dry_run": self.dry_run,
                "redriven": [{"position": p, "original": o, "redriven_as": n} for p, o, n in self.redriven],
                "deadline_passed": self.deadline_passed,
                "already_redriven": [{"position": p, "redriven_as": n} for p, n in self.already_redriven],
                "redriven_with": [{"position": p, "same_job_as": f, "redriven_as": n}
                                  for p, f, n in self.redriven_with],
                "failed_again": [{"position": p, "redrive_of": o} for p, o in self.failed_again],
                "not_redrivable": [{"position": p, "why": w} for p, w in self.not_redrivable]}


def redriven_record(record: RequestRecord, new_key: str, *, extend_deadline_s: float | None,
                    at: float) -> tuple[RequestRecord, bool]:
    """The new job's record: the original's under the derived client ID, with fresh timings; a deadline
    that passed is kept (the job ends ``expired``: the second value is True) unless one is given."""
    update: dict[str, object] = {"request_id": client_id_of(new_key), "timings": Timings()}
    passed = record.deadline_at is not None and record.deadline_at <= at
    if passed and extend_deadline_s is not None:
        update["deadline_at"] = at + extend_deadline_s
        passed = False
    new = record.model_copy(update=update)
    assert key_of(new) == new_key, (key_of(new), new_key)  # same tenant: the derived key is the new job's
    return new, passed


async def redrive_letters(ledger: RequestLedger, submitter: Submitter, verdicts: list[Verdict], *,
                          extend_deadline_s: float | None = None, dry_run: bool = False,
                          progress: Progress | None = None) -> DlqRedriveReport:
    """Re-drive each REDRIVABLE dead letter as a new job (see the module's docstring). Each is reserved in
    the ledger (dead letter to new key), then claimed and published with the gateway's code; a run that
    stops between the two is finished by the next, under the same key."""
    check_extension(extend_deadline_s)
    tell = progress or (lambda _phase, _n, _total: None)
    report = DlqRedriveReport(dry_run)
    todo = [v for v in verdicts if v.state == REDRIVABLE]
    for v in verdicts:
        if v.state == REDRIVEN:
            report.already_redriven.append((v.letter.position, v.detail))
        elif v.state == FAILED_AGAIN:
            report.failed_again.append((v.letter.position, v.detail))
        elif v.state == NOT_REDRIVABLE:
            report.not_redrivable.append((v.letter.position, v.detail))
    at = now()
    became: dict[str, str] = {}
    """This run's re-drives: the first dead letter's identity → the new job key."""
    for v in todo:
        assert v.record is not None
        if v.same_as is not None:  # the same job and payload as an earlier dead letter: re-driven with it
            report.redriven_with.append((v.letter.position, v.same_as.position,
                                         became.get(v.same_as.identity, "(new)")))
            continue
        original = key_of(v.record)
        if dry_run:
            report.redriven.append((v.letter.position, original, "(new)"))
            if v.record.deadline_at is not None and v.record.deadline_at <= at and extend_deadline_s is None:
                report.deadline_passed.append(f"(re-drive of {original})")
            continue
        new_key, _reserved = await ledger.reserve_redrive(v.letter.identity, original, payload_hash(v.record),
                                                          v.letter.position, at)
        record, passed = redriven_record(v.record, new_key, extend_deadline_s=extend_deadline_s, at=at)
        await submitter.submit_now(record)
        became[v.letter.identity] = new_key
        report.redriven.append((v.letter.position, original, new_key))
        if passed:
            report.deadline_passed.append(new_key)
        log.info("dead letter %s re-driven as %s", v.letter.position, new_key)
        tell("re-driving", 1, len(todo))
    return report


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def preview(text: str, limit: int) -> str:
    """A value as one printable line (control characters escaped), at most ``limit`` characters."""
    shown = text.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"
