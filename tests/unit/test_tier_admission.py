"""The one admission module (inferlog.admission) per tier, over a fake ledger count, and ``inferlog submit``
feeding a file in as room frees (inferlog.submitfile). The HTTP path is tests/integration/test_tenants.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from inferlog.admission import Admission, Limits, Overloaded
from inferlog.batchfile import read_lines
from inferlog.ledger import Claim, OpenCount, key_of
from inferlog.messages import Priority, RequestRecord, Status
from inferlog.submitfile import submit_lines

LIMITS = Limits(max_in_flight=100, tenant_max_in_flight=10, batch_share=0.8)


class Counts:
    """``open_count`` as the ledger answers it: per tenant (None: everyone)."""

    def __init__(self, counts: dict[str | None, OpenCount]) -> None:
        self.counts = counts

    async def open_count(self, tenant: str | None = None) -> OpenCount:
        return self.counts.get(tenant, OpenCount(0, 0))

    async def recent_throughput(self) -> tuple[float, float]:
        return 50.0, 10.0


def admit(counts: dict[str | None, OpenCount], tenant: str | None, priority: Priority) -> str:
    try:
        asyncio.run(Admission(Counts(counts), LIMITS).admit(tenant, priority))  # type: ignore[arg-type]
    except Overloaded as exc:
        return exc.code
    return "ok"


def test_a_batch_backlog_never_refuses_interactive_work() -> None:
    backlog = {None: OpenCount(in_flight=95, awaiting_redrive=0, batch=90)}
    assert admit(backlog, None, Priority.INTERACTIVE) == "ok"  # 5 interactive in flight, limit 100
    assert admit(backlog, None, Priority.BATCH) == "overloaded"  # 95 in flight >= 80: batch waits


def test_interactive_load_sheds_the_batch_tier_first() -> None:
    busy = {None: OpenCount(in_flight=85, awaiting_redrive=0, batch=0)}
    assert admit(busy, None, Priority.BATCH) == "overloaded" and admit(busy, None, Priority.INTERACTIVE) == "ok"
    full = {None: OpenCount(in_flight=100, awaiting_redrive=0, batch=0)}
    assert admit(full, None, Priority.INTERACTIVE) == "overloaded"


def test_a_tenants_limit_holds_within_each_tier() -> None:
    counts = {None: OpenCount(20, 0, 10), "acme": OpenCount(10, 0, 10)}
    assert admit(counts, "acme", Priority.BATCH) == "tenant_limit"
    assert admit(counts, "acme", Priority.INTERACTIVE) == "ok"
    admission = Admission(Counts(counts), LIMITS)  # type: ignore[arg-type]
    assert asyncio.run(admission.room("acme", Priority.INTERACTIVE)) == 10
    assert asyncio.run(admission.room(None, Priority.BATCH)) == 60


class Submitter:
    def __init__(self) -> None:
        self.claimed: list[str] = []

    async def claim_and_publish(self, records: list[RequestRecord]) -> tuple[list[Any], set[str]]:
        self.claimed += [key_of(r) for r in records]
        return [Claim(key_of(r), created=True, status=Status.RECEIVED) for r in records], {key_of(r) for r in records}


@pytest.mark.asyncio(loop_scope="function")
async def test_submit_feeds_a_file_in_as_room_frees() -> None:
    data = b"\n".join(b'{"request_id": "r%d", "model": "m", "params": {"max_tokens": 1}, "prompt": "x", '
                      b'"priority": "batch"}' % i for i in range(30))
    lines = read_lines(data, namespace="ns", known_models=["m"], default_model="m")
    counts = Counts({None: OpenCount(in_flight=75, awaiting_redrive=0, batch=75)})  # room for 5 (of 80)
    submitter = Submitter()
    feeding = asyncio.create_task(submit_lines(
        submitter, lines, admission=Admission(counts, LIMITS), room_poll_s=0.05))  # type: ignore[arg-type]
    await asyncio.sleep(0.3)  # (counts are cached 0.5 s: real time, as admission reads it)
    assert submitter.claimed == [f"ns.r{i}" for i in range(5)], "took more than the tier had room for"
    counts.counts[None] = OpenCount(in_flight=0, awaiting_redrive=0, batch=0)  # the backlog finished
    report = await asyncio.wait_for(feeding, 10)
    assert submitter.claimed == [f"ns.r{i}" for i in range(30)] and len(report.submitted) == 30  # in file order


@pytest.mark.asyncio(loop_scope="function")
async def test_mixed_tenants_share_the_tiers_room_and_a_full_tier_is_given_up_on() -> None:
    data = b"\n".join(b'{"request_id": "r%d", "tenant": "%s", "model": "m", "params": {"max_tokens": 1}, '
                      b'"prompt": "x", "priority": "batch"}' % (i, b"ab"[i % 2:i % 2 + 1]) for i in range(20))
    lines = read_lines(data, namespace="ns", known_models=["m"], default_model="m")
    counts = Counts({None: OpenCount(in_flight=74, awaiting_redrive=0, batch=74)})  # 6 of 80 left, for both
    submitter = Submitter()
    report = await submit_lines(submitter, lines, admission=Admission(counts, LIMITS),  # type: ignore[arg-type]
                                room_poll_s=0.05, room_timeout_s=0.2)
    assert len(submitter.claimed) == 6, "each tenant took the whole tier's room"
    assert [code for _n, code, _m in report.errors] == ["no_room"] * 14
