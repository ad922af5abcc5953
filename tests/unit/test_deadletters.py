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
                 origins: dict[str, str] | None = None, statuses: dict[str, Status] | None = None) -> None:
        self.payloads = payloads
        self.reserved = dict(reserved or {})
        self.origins = origins or {}
        self.statuses = statuses or {}
        self.claimed: list[RequestRecord] = []

    async def redrives(self, identities: list[str]) -> dict[str, str]:
        return {i: k for i, k in self.reserved.items() if i in identities}

    async def redrive_origins(self, keys: list[str]) -> dict[str, str]:
        return {k: o for k, o in self.origins.items() if k in keys}

    async def get_many(self, keys: list[str]) -> list[JobView]:
        return [JobView(k, self.statuses.get(k, Status.QUEUED), None, None, None, None, None, None, None, {}, None)
                for k in keys if k in self.statuses]

    async def entries(self, *, keys: list[str], **_: Any) -> list[LedgerEntry]:
        return [LedgerEntry(k, None, Status.FAILED, True, self.payloads[k], None, 1.0) for k in keys
                if k in self.payloads]

    async def reserve_redrive(self, identity: str, original: str, position: str, at: float) -> tuple[str, bool]:
        if identity in self.reserved:
            return self.reserved[identity], False
        self.reserved[identity] = job_key(None, redrive_id(original.partition("/")[2] or original, 1))
        if "/" in original:
            self.reserved[identity] = f"{original.partition('/')[0]}/{redrive_id(original.partition('/')[2], 1)}"
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
