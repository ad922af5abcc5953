"""``inferlog dlq``'s pieces (inferlog.deadletters) over a fake ledger: dead-letter identity, positions,
filters, verdicts for later stages' dead letters, the derived ID and the re-driven record. The real broker,
Postgres and services path is tests/faults/test_operator_dlq.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from inferlog.deadletters import (
    FAILED_AGAIN,
    NOT_REDRIVABLE,
    REDRIVABLE,
    REDRIVEN,
    Dlq,
    Letter,
    LetterFilter,
    Verdict,
    assess,
    identity_of,
    parse_position,
    preview,
    redrive_letters,
    redriven_record,
)
from inferlog.errors import ConfigError
from inferlog.identity import is_client_id, job_key
from inferlog.ledger import Claim, JobView, LedgerEntry, key_of, redrive_id
from inferlog.messages import GenerationParams, RequestRecord, Status, Timings, dead_letter
from inferlog.topics import Topics

TOPICS = Topics("t", 6)


def record(rid: str, *, tenant: str | None = None, deadline_at: float | None = None) -> RequestRecord:
    return RequestRecord(request_id=rid, model="m", prompt=f"prompt {rid}", params=GenerationParams(max_tokens=4),
                         tenant=tenant, deadline_at=deadline_at, timings=Timings(received_at=1.0))


def letter(stage: str, topic: str, offset: int, request_id: str | None, value: bytes | str, *,
           dlq_offset: int = 0, at: float = 100.0) -> Letter:
    dead = dead_letter(stage, "engine_error: it failed", topic=topic, partition=0, offset=offset,
                       request_id=request_id, value=value).model_copy(update={"at": at})
    return Letter(0, dlq_offset, dead, identity_of(dead))


class FakeLedger:
    def __init__(self, payloads: dict[str, str | None], *, reserved: dict[str, str] | None = None,
                 origins: dict[str, str] | None = None, statuses: dict[str, Status] | None = None,
                 jobs: dict[str, Status] | None = None) -> None:
        self.payloads = payloads
        self.reserved = dict(reserved or {})
        self.by_payload: dict[tuple[str, str], str] = {}
        self.origins = origins or {}
        self.statuses = statuses or {}
        """Polled status of (re-drive) job keys."""
        self.jobs = jobs or {}
        """Status of the jobs whose payloads these are (failed unless named)."""
        self.claimed: list[RequestRecord] = []
        self.asked: list[str] = []
        """Every key any query was given (Postgres refuses a list holding NUL)."""

    def _ask(self, keys: list[str]) -> None:
        self.asked += keys

    async def redrives(self, identities: list[str]) -> dict[str, str]:
        return {i: k for i, k in self.reserved.items() if i in identities}

    async def redrive_origins(self, keys: list[str]) -> dict[str, str]:
        self._ask(keys)
        return {k: o for k, o in self.origins.items() if k in keys}

    async def redrives_of(self, keys: list[str]) -> dict[tuple[str, str], str]:
        self._ask(keys)
        return {(k, d): n for (k, d), n in self.by_payload.items() if k in keys}

    async def get_many(self, keys: list[str]) -> list[JobView]:
        self._ask(keys)
        return [JobView(k, self.statuses.get(k, Status.QUEUED), None, None, None, None, None, None, None, {}, None)
                for k in keys if k in self.statuses]

    async def entries(self, *, keys: list[str], **_: Any) -> list[LedgerEntry]:
        self._ask(keys)
        return [LedgerEntry(k, None, self.jobs.get(k, Status.FAILED), self.jobs.get(k, Status.FAILED).is_terminal(),
                            self.payloads[k], None, 1.0) for k in keys if k in self.payloads]

    async def reserve_redrive(self, identity: str, original: str, digest: str, position: str,
                              at: float) -> tuple[str, bool]:
        if identity in self.reserved:
            return self.reserved[identity], False
        if (original, digest) in self.by_payload:
            return self.by_payload[(original, digest)], False
        n = 1 + sum(1 for (key, _d) in self.by_payload if key == original)  # the next n of this original
        self.reserved[identity] = job_key(None, redrive_id(original.partition("/")[2] or original, n))
        if "/" in original:
            self.reserved[identity] = f"{original.partition('/')[0]}/{redrive_id(original.partition('/')[2], n)}"
        self.by_payload[(original, digest)] = self.reserved[identity]
        return self.reserved[identity], True


class FakeSubmitter:
    def __init__(self) -> None:
        self.submitted: list[RequestRecord] = []

    async def submit_now(self, r: RequestRecord) -> Claim:
        self.submitted.append(r)
        return Claim(key_of(r), created=True, status=Status.QUEUED)


def test_copies_of_one_dead_letter_share_its_identity_and_others_do_not() -> None:
    one = letter("tokenizer", "t.requests.v1", 7, "a", b"{}", dlq_offset=1, at=1.0)
    copy = letter("tokenizer", "t.requests.v1", 7, "a", b"{}", dlq_offset=9, at=2.0)
    assert one.identity == copy.identity
    assert letter("tokenizer", "t.requests.v1", 8, "a", b"{}").identity != one.identity
    assert letter("gpu-worker", "t.requests.v1", 7, "a", b"{}").identity != one.identity
    assert letter("tokenizer", "t.requests.v1", 7, "a", b"{ }").identity != one.identity


def test_positions_parse_or_refuse_in_one_line() -> None:
    assert parse_position("3:17") == (3, 17) and parse_position("17") == (0, 17)
    for bad in ("x", "1:", "-1:2", "1:-2", "", "1:2:3"):
        with pytest.raises(ConfigError, match="position"):
            parse_position(bad)


def test_filters_match_stage_reason_any_case_and_time() -> None:
    one = letter("gpu-worker", "t.tokenized.interactive.v1", 1, "a", b"{}", at=50.0)
    assert LetterFilter().matches(one)
    assert LetterFilter(stage="gpu-worker", reason="ENGINE_error", since=50.0).matches(one)
    assert not LetterFilter(stage="tokenizer").matches(one)
    assert not LetterFilter(reason="conflict").matches(one)
    assert not LetterFilter(since=50.5).matches(one)


def test_derived_ids_stay_client_ids_and_within_the_limit() -> None:
    assert redrive_id("abc", 1) == "abc.redrive-1" and redrive_id("abc.redrive-1", 2) == "abc.redrive-1.redrive-2"
    long = "x" * 128
    derived = [redrive_id(long, n) for n in (1, 2, 10)]
    assert all(len(d) <= 128 and is_client_id(d) for d in derived) and len(set(derived)) == 3
    assert redrive_id("y" * 128, 1) != derived[0]  # the digest tells long IDs apart


def test_the_redriven_record_is_the_original_under_the_new_id_in_its_tenant() -> None:
    original = record("a", tenant="acme", deadline_at=10.0)
    new, passed = redriven_record(original, "acme/a.redrive-1", extend_deadline_s=None, at=20.0)
    assert new.request_id == "a.redrive-1" and new.tenant == "acme" and key_of(new) == "acme/a.redrive-1"
    assert new.prompt == original.prompt and new.timings == Timings() and passed and new.deadline_at == 10.0
    extended, passed = redriven_record(original, "acme/a.redrive-1", extend_deadline_s=60.0, at=20.0)
    assert extended.deadline_at == 80.0 and not passed
    ahead, passed = redriven_record(record("b", deadline_at=99.0), "b.redrive-1", extend_deadline_s=None, at=20.0)
    assert ahead.deadline_at == 99.0 and not passed
    with pytest.raises(AssertionError):  # another tenant's key is never the new job's
        redriven_record(original, "other/a.redrive-1", extend_deadline_s=None, at=20.0)


def test_verdicts_for_every_kind_of_dead_letter() -> None:
    failed = record("w")
    letters = [
        letter("gpu-worker", "t.tokenized.interactive.v1", 1, "w", failed.model_dump_json(), dlq_offset=0),
        letter("result-store", "t.results.v1", 2, "first-sight", b"{}", dlq_offset=1),
        letter("result-store", "t.results.v1", 3, None, b"\xff", dlq_offset=2),
        letter("tokenizer", TOPICS.requests, 4, "again.redrive-1", record("again.redrive-1").model_dump_json(),
               dlq_offset=3),
        letter("tokenizer", TOPICS.requests, 5, None, b'{"request_id": "r"}', dlq_offset=4),
        letter("tokenizer", TOPICS.requests, 6, "r", record("ok").model_dump_json(), dlq_offset=5),
        letter("tokenizer", TOPICS.requests, 7, "done", record("done").model_dump_json(), dlq_offset=6),
        letter("tokenizer", TOPICS.requests, 8, "halfway", record("halfway").model_dump_json(), dlq_offset=7),
    ]
    ledger = FakeLedger({"w": failed.model_dump_json(exclude_none=True), "first-sight": None},
                        reserved={letters[6].identity: "done.redrive-1", letters[7].identity: "halfway.redrive-1"},
                        origins={"again.redrive-1": "again"},
                        statuses={"done.redrive-1": Status.COMPLETED, "halfway.redrive-1": Status.RECEIVED})
    verdicts = asyncio.run(assess(ledger, "unused:9092", TOPICS, letters))  # type: ignore[arg-type]
    states = [(v.state, v.detail) for v in verdicts]
    assert states[0] == (REDRIVABLE, "") and verdicts[0].record == failed  # a later stage's: the ledger payload
    assert states[1] == (NOT_REDRIVABLE, "the ledger holds no payload for job first-sight")
    assert states[2][0] == NOT_REDRIVABLE and "names no job" in states[2][1]
    assert states[3] == (FAILED_AGAIN, "again")
    assert states[4][0] == NOT_REDRIVABLE and "does not read as a request: model" in states[4][1]
    assert states[5] == (REDRIVABLE, "") and verdicts[5].record is not None and verdicts[5].record.request_id == "ok"
    assert states[6] == (REDRIVEN, "done.redrive-1")
    # Reserved but never published (a re-drive that stopped): re-drivable, and finished under the same key.
    assert states[7] == (REDRIVABLE, "")
    submitter = FakeSubmitter()
    report = asyncio.run(redrive_letters(ledger, submitter, verdicts))  # type: ignore[arg-type]
    assert [n for _p, _o, n in report.redriven] == ["w.redrive-1", "ok.redrive-1", "halfway.redrive-1"]
    assert [r.request_id for r in submitter.submitted] == ["w.redrive-1", "ok.redrive-1", "halfway.redrive-1"]
    assert report.already_redriven == [("0:6", "done.redrive-1")] and report.failed_again == [("0:3", "again")]
    assert [p for p, _w in report.not_redrivable] == ["0:1", "0:2", "0:4"]
    dry = asyncio.run(redrive_letters(ledger, FakeSubmitter(), verdicts, dry_run=True))  # type: ignore[arg-type]
    assert len(dry.redriven) == 3 and all(n == "(new)" for _p, _o, n in dry.redriven)


def test_a_verdict_names_its_original_job() -> None:
    one = letter("tokenizer", TOPICS.requests, 1, "acme/x", b"{}")
    assert Verdict(one, REDRIVABLE, record=record("x", tenant="acme")).original_key == "acme/x"
    assert Verdict(one, NOT_REDRIVABLE, "why").original_key == "acme/x"


def test_previews_are_one_bounded_printable_line() -> None:
    assert preview("a\nb\x00c", 100) == "a\\nb\\x00c"
    assert preview("x" * 50, 10) == "x" * 9 + "…"


def test_one_job_is_re_driven_once_whatever_number_of_dead_letters_it_left() -> None:
    # The same record twice on the requests topic (a produce that timed out but landed, and the relay's), each
    # refused by a bad deploy: two dead letters (other offsets, other bytes), one job to re-drive.
    first = record("x").model_copy(update={"timings": Timings(received_at=1.0, queued_at=2.0)})
    again = record("x").model_copy(update={"timings": Timings(received_at=1.0, queued_at=3.0)})
    letters = [letter("tokenizer", TOPICS.requests, 4, "x", first.model_dump_json(), dlq_offset=0),
               letter("tokenizer", TOPICS.requests, 9, "x", again.model_dump_json(), dlq_offset=1),
               letter("tokenizer", TOPICS.requests, 10, "x", record("x").model_copy(
                   update={"prompt": "another payload"}).model_dump_json(), dlq_offset=2)]
    assert letters[0].identity != letters[1].identity
    ledger = FakeLedger({"x": record("x").model_dump_json(exclude_none=True)})
    verdicts = asyncio.run(assess(ledger, "unused:9092", TOPICS, letters))  # type: ignore[arg-type]
    assert [v.state for v in verdicts] == [REDRIVABLE] * 3
    assert verdicts[1].same_as == letters[0] and verdicts[0].same_as is None and verdicts[2].same_as is None
    dry = asyncio.run(redrive_letters(ledger, FakeSubmitter(), verdicts, dry_run=True))  # type: ignore[arg-type]
    assert len(dry.redriven) == 2 and dry.redriven_with == [("0:1", "0:0", "(new)")] and dry.already_redriven == []
    submitter = FakeSubmitter()
    report = asyncio.run(redrive_letters(ledger, submitter, verdicts))  # type: ignore[arg-type]
    assert [r.request_id for r in submitter.submitted] == ["x.redrive-1", "x.redrive-2"]  # the other payload's own
    assert report.redriven_with == [("0:1", "0:0", "x.redrive-1")]
    # A later run (the copy was never reserved itself): the job it re-drives is on the log, so it is re-driven.
    ledger.statuses = {"x.redrive-1": Status.QUEUED}
    later = asyncio.run(assess(ledger, "unused:9092", TOPICS, letters[:2]))  # type: ignore[arg-type]
    assert [(v.state, v.detail) for v in later] == [(REDRIVEN, "x.redrive-1")] * 2


def test_only_a_job_the_dead_letter_ended_failed_is_re_driven() -> None:
    payload = record("j").model_dump_json(exclude_none=True)
    event = letter("result-store", "t.events.v1", 1, "j", b"{}")
    same = letter("tokenizer", TOPICS.requests, 2, "j", record("j").model_dump_json())
    other = letter("tokenizer", TOPICS.requests, 3, "j", record("j").model_copy(
        update={"prompt": "an ID reused"}).model_dump_json())

    def states(status: Status) -> list[tuple[str, str]]:
        ledger = FakeLedger({"j": payload}, jobs={"j": status})
        verdicts = asyncio.run(assess(ledger, "unused:9092", TOPICS, [event, same, other]))  # type: ignore[arg-type]
        return [(v.state, v.detail) for v in verdicts]

    assert [s for s, _d in states(Status.FAILED)] == [REDRIVABLE, REDRIVABLE, REDRIVABLE]
    running = states(Status.RUNNING)
    assert [s for s, _d in running] == [NOT_REDRIVABLE, NOT_REDRIVABLE, REDRIVABLE], running
    assert "still running" in running[0][1] and "inferlog replay" in running[0][1]
    completed = states(Status.COMPLETED)
    assert [s for s, _d in completed] == [NOT_REDRIVABLE, NOT_REDRIVABLE, REDRIVABLE], completed
    assert "ended completed" in completed[1][1]  # an event refused while the job completed: nothing to run


def test_a_key_holding_nul_names_no_job_and_reaches_no_query() -> None:
    letters = [letter("result-store", "t.results.v1", 1, "a\x00b", b"{}", dlq_offset=0),
               letter("gpu-worker", "t.tokenized.interactive.v1", 2, "w", record("w").model_dump_json(),
                      dlq_offset=1)]
    ledger = FakeLedger({"w": record("w").model_dump_json(exclude_none=True)})
    verdicts = asyncio.run(assess(ledger, "unused:9092", TOPICS, letters))  # type: ignore[arg-type]
    assert verdicts[0].state == NOT_REDRIVABLE and "NUL" in verdicts[0].detail
    assert verdicts[1].state == REDRIVABLE  # the others are still judged
    assert ledger.asked and not any("\x00" in k for k in ledger.asked), ledger.asked


def test_a_copy_that_is_not_the_records_bytes_is_read_back_from_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = record("u").model_dump_json().replace("prompt u", "prompt \\u00e9").encode().replace(b"\\u00e9", b"\xff")
    bad = letter("tokenizer", TOPICS.requests, 5, "u", raw)
    assert not bad.dead.truncated and "\ufffd" in bad.dead.value  # the copy reads, with U+FFFD for the byte
    reads: list[tuple[str, int, int]] = []

    async def gone(_bootstrap: str, topic: str, partition: int, offset: int) -> None:
        reads.append((topic, partition, offset))

    monkeypatch.setattr("inferlog.deadletters.read_at", gone)
    [verdict] = asyncio.run(assess(FakeLedger({}), "unused:9092", TOPICS, [bad]))  # type: ignore[arg-type]
    assert reads == [(TOPICS.requests, 0, 5)]
    assert verdict.state == NOT_REDRIVABLE and "invalid UTF-8" in verdict.detail, verdict


def test_a_dry_run_counts_the_deadlines_that_passed() -> None:
    late = letter("tokenizer", TOPICS.requests, 1, "late", record("late", deadline_at=5.0).model_dump_json())
    verdicts = asyncio.run(assess(FakeLedger({}), "unused:9092", TOPICS, [late]))  # type: ignore[arg-type]
    dry = asyncio.run(redrive_letters(FakeLedger({}), FakeSubmitter(), verdicts, dry_run=True))  # type: ignore[arg-type]
    assert len(dry.deadline_passed) == 1
    extended = asyncio.run(redrive_letters(FakeLedger({}), FakeSubmitter(), verdicts, dry_run=True,  # type: ignore[arg-type]
                                           extend_deadline_s=60.0))
    assert extended.deadline_passed == []


def test_a_copy_is_found_at_its_own_position() -> None:
    one = letter("tokenizer", TOPICS.requests, 7, "a", b"{}")
    dlq = Dlq([Letter(0, 3, one.dead, one.identity, 2, ((1, 8),))])
    assert dlq.find(0, 3) is dlq.letters[0] and dlq.find(1, 8) is dlq.letters[0] and dlq.find(1, 9) is None
