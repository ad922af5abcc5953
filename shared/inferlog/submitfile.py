"""``inferlog submit FILE.jsonl``: a file of requests onto the log, line by line, durably and resumably.

Each good line (``inferlog.batchfile``) is admitted by the gateway's admission module (``inferlog.admission``:
the file is fed in as room frees in its tier, never refused, so a large file neither 429s interactive
clients nor is cut short by a tenant's limit), then claimed in the ledger and produced with the gateway's code
(``Submitter.claim_and_publish``: claim, produce, mark published; no outbox relay need be running, so a claim
an earlier run left unpublished is published by this one). Claims are keyed by the line's derived ID, so
running the same file again submits nothing twice: lines already claimed are counted, not sent. With
``wait`` it then waits for every line's job to end, and ``output_line`` writes one line per input line, in
input order: OpenAI's batch output format (``custom_id``, ``response``, ``error``) for OpenAI batch lines,
the job's outcome for inferlog records; a bad line's error stands in its place.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from inferlog.admission import Admission
from inferlog.batchfile import BatchLine, completion_object, openai_usage
from inferlog.errors import IdempotencyConflict
from inferlog.ledger import JobView, RequestLedger, key_of
from inferlog.messages import Priority, Status
from inferlog.publishing import Submitter
from inferlog.recovery import Progress

CHUNK = 100
"""Lines claimed and produced per round trip."""


@dataclass
class SubmitReport:
    lines: int = 0
    submitted: list[str] = field(default_factory=list)
    """Job keys claimed (or published, for a claim an earlier run left unpublished) by this run."""
    already: list[str] = field(default_factory=list)
    """Job keys an earlier run had submitted: nothing sent."""
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    """(line number, code, message) of each line not submitted."""
    outcomes: dict[str, int] = field(default_factory=dict)
    """With ``wait``: the lines' jobs by final status (``unfinished`` for those still open)."""

    def counts(self) -> dict[str, int]:
        return {"lines": self.lines, "submitted now": len(self.submitted),
                "already submitted (nothing sent)": len(self.already), "lines with errors": len(self.errors),
                **{f"  {status}": n for status, n in sorted(self.outcomes.items())}}

    def to_json(self) -> dict[str, Any]:
        return {"lines": self.lines, "submitted": len(self.submitted), "already_submitted": len(self.already),
                "errors": [{"line": n, "code": c, "message": m} for n, c, m in self.errors],
                "outcomes": self.outcomes}


async def submit_lines(submitter: Submitter, lines: list[BatchLine], *, rate: float | None = None,
                       admission: Admission | None = None, room_poll_s: float = 1.0,
                       room_timeout_s: float | None = None, progress: Progress | None = None) -> SubmitReport:
    """Claim and produce every good line in file order, ``CHUNK`` at a time, at most ``rate`` lines a second,
    each only once ``admission`` has room for it in its tier (and tenant): waiting, not refused. A wait for
    room longer than ``room_timeout_s`` (the workers down, say) stops the run: the lines not sent are
    reported (``no_room``), and running the same command again goes on from there."""
    tell = progress or (lambda _phase, _n, _total: None)
    report = SubmitReport(lines=len(lines))
    report.errors = [(ln.number, ln.error.code, ln.error.message) for ln in lines if ln.error is not None]
    good = [ln for ln in lines if ln.record is not None]
    paced_from, sent, waiting_since = time.monotonic(), 0, None
    while sent < len(good):
        if rate:  # paced by the lines sent so far, not by a sleep per chunk
            await asyncio.sleep(max(0.0, paced_from + sent / rate - time.monotonic()))
        chunk = await _admitted(admission, good[sent:sent + CHUNK])
        if not chunk:  # the tier is full: wait for room to free, as a client would after a 429
            waiting_since = waiting_since or time.monotonic()
            if room_timeout_s is not None and time.monotonic() - waiting_since > room_timeout_s:
                report.errors += [(ln.number, "no_room", f"no room in its tier for {room_timeout_s:.0f}s: not "
                                   "submitted (run the same command again to go on)") for ln in good[sent:]]
                break
            tell("waiting for room", 0, None)
            await asyncio.sleep(room_poll_s)
            continue
        if waiting_since is not None and rate:  # no burst to catch up on the time spent waiting
            paced_from += time.monotonic() - waiting_since
        waiting_since = None
        sent += len(chunk)
        outcomes, published = await submitter.claim_and_publish([ln.record for ln in chunk if ln.record is not None])
        for line, outcome in zip(chunk, outcomes, strict=True):
            if isinstance(outcome, IdempotencyConflict):
                report.errors.append((line.number, outcome.code or "idempotency_key_reused",
                                      f"{outcome.message} (the file changed under the same namespace?)"))
            elif outcome.created or outcome.request_id in published:
                report.submitted.append(outcome.request_id)
                if admission is not None and outcome.created and line.record is not None:
                    admission.accepted(line.record.tenant, line.record.priority)
            else:
                report.already.append(outcome.request_id)
        tell("submitting", len(chunk), len(good))
    report.errors.sort()
    return report


async def _admitted(admission: Admission | None, lines: list[BatchLine]) -> list[BatchLine]:
    """The leading lines admission has room for, in file order (a line with no room stops the chunk: no
    later line overtakes it). Each line taken uses room everywhere it counts: its tier's, its tenant's within
    the tier, and (interactive work) the batch tier's, which is held against everything in flight."""
    if admission is None:
        return lines
    tiers = {p: await admission.room(None, p) for p in Priority}
    tenants: dict[tuple[str, Priority], int] = {}
    taken = []
    for line in lines:
        assert line.record is not None
        tenant, tier = line.record.tenant, line.record.priority
        if tenant is not None and (tenant, tier) not in tenants:
            tenants[(tenant, tier)] = await admission.room(tenant, tier)
        if tiers[tier] < 1 or (tenant is not None and tenants[(tenant, tier)] < 1):
            break
        tiers[tier] -= 1
        if tier is Priority.INTERACTIVE:
            tiers[Priority.BATCH] -= 1
        if tenant is not None:
            tenants[(tenant, tier)] -= 1
        taken.append(line)
    return taken


async def wait_for(ledger: RequestLedger, keys: list[str], *, timeout_s: float, poll_s: float = 1.0,
                   progress: Progress | None = None) -> dict[str, JobView]:
    """Every job's view once all are terminal, or when ``timeout_s`` passed (some may then be open)."""
    tell = progress or (lambda _phase, _n, _total: None)
    deadline = time.monotonic() + timeout_s
    views: dict[str, JobView] = {}
    done: set[str] = set()
    while True:
        pending = [k for k in keys if k not in done]
        for i in range(0, len(pending), 1000):
            for view in await ledger.get_many(pending[i:i + 1000]):
                views[view.request_id] = view
                if view.status.is_terminal() and view.request_id not in done:
                    done.add(view.request_id)
                    tell("finished", 1, len(keys))
        if len(done) == len(keys) or time.monotonic() >= deadline:
            return views
        await asyncio.sleep(poll_s)


def output_line(line: BatchLine, view: JobView | None) -> dict[str, Any]:
    """One output line for one input line: OpenAI's batch output format for an OpenAI line, else the job's
    outcome; a line that was never submitted carries its error."""
    key = key_of(line.record) if line.record is not None else None
    error: dict[str, Any] | None = None
    if line.error is not None:
        error = {"code": line.error.code, "message": line.error.message, "line": line.number}
    elif view is None or not view.status.is_terminal():
        error = {"code": "unfinished", "message": f"the job is still {view.status.value if view else 'unknown'}: "
                 "run the same command again with --wait to collect it", "line": line.number}
    elif view.status is not Status.COMPLETED:
        error = {**(view.error or {}), "line": line.number, "status": view.status.value}
        error.setdefault("code", view.status.value)
        error.setdefault("message", f"the job ended {view.status.value}")
    if not line.openai:
        result = None if error is not None or view is None else {
            "text": view.text, "finish_reason": view.finish_reason, "usage": openai_usage(view)}
        return {"line": line.number, "custom_id": line.custom_id,
                "request_id": line.record.request_id if line.record is not None else None,
                "status": view.status.value if view is not None else None, "result": result, "error": error}
    out: dict[str, Any] = {"id": f"batch_req_{hashlib.sha256((key or str(line.number)).encode()).hexdigest()[:24]}",
                           "custom_id": line.custom_id, "response": None, "error": error}
    if error is None and view is not None:
        chat = line.record is not None and line.record.messages is not None
        out["response"] = {"status_code": 200, "request_id": view.client_id,
                           "body": completion_object(view, chat=chat)}
    return out
