"""Polls read Redis first, but never believe a stale copy of a job in progress (issue 8): the store's write
of its terminal status may have failed to reach Redis, and the job would look unfinished for minutes."""

from __future__ import annotations

import time
from typing import Any

from inferlog.ledger import JobView
from inferlog.messages import Status
from inferlog_gateway.jobs import HOT_FRESH_S, JobReader


def _view(status: Status) -> JobView:
    return JobView(request_id="j", status=status, model="m", model_version=None, text=None, finish_reason=None,
                   prompt_tokens=None, completion_tokens=None, error=None, timings={}, tenant=None)


class Hot:
    def __init__(self, view: dict[str, Any]) -> None:
        self.view = view

    async def get(self, request_id: str) -> dict[str, Any]:
        return self.view


class Ledger:
    reads = 0

    async def get(self, request_id: str) -> JobView:
        self.reads += 1
        return _view(Status.COMPLETED)


async def test_a_stale_hot_view_of_a_running_job_is_checked_against_postgres() -> None:
    ledger = Ledger()
    stale = {**_view(Status.RUNNING).to_hot(), "hot_at": time.time() - HOT_FRESH_S - 1}
    assert (await JobReader(ledger, Hot(stale)).get("j")).status is Status.COMPLETED  # type: ignore[arg-type, union-attr]
    assert ledger.reads == 1


async def test_a_fresh_or_terminal_hot_view_is_answered_from_redis() -> None:
    ledger = Ledger()
    fresh = {**_view(Status.RUNNING).to_hot(), "hot_at": time.time()}
    assert (await JobReader(ledger, Hot(fresh)).get("j")).status is Status.RUNNING  # type: ignore[arg-type, union-attr]
    old_terminal = {**_view(Status.FAILED).to_hot(), "hot_at": 0}
    assert (await JobReader(ledger, Hot(old_terminal)).get("j")).status is Status.FAILED  # type: ignore[arg-type, union-attr]
    assert ledger.reads == 0
