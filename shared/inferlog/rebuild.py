"""``inferlog rebuild-store``: the result store rebuilt from the log, and compared with the live one.

The store is a view of the log: every column a poll shows is decided by a record on the requests, events
or results topic. This rebuilds that view into a fresh schema through the services' own code paths (the
tokenizer's claim of a record on the log, the gateway's mark of a published one, the result-store's sink for
events and results, applied in the order the log appended them) and compares it with the live schema,
job by job and column by column for what the log carries: status, result text, finish reason, usage,
model and version, tenant, error and timings.

The log may be incomplete (a broker that lost its log, retention): the earliest record seen on each topic
is reported, jobs only in the live store are counted apart (with how many were never published, which no
log can hold), and the rebuild never claims more than it saw. What the log does not carry (a cancel's
request time, replay counts, the published flag) is not compared.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from inferlog.db import connect_pool, migrate
from inferlog.errors import ConfigError, IdempotencyConflict
from inferlog.ledger import JobView, RequestLedger, key_of
from inferlog.logscan import LoggedRecord, scan
from inferlog.messages import EventRecord, RequestRecord, ResultRecord
from inferlog.recovery import Progress
from inferlog.topics import Topics

SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
COMPARED = ("status", "text", "finish_reason", "prompt_tokens", "completion_tokens", "model", "model_version",
            "tenant", "error", "timings")
"""The columns of a job the log decides (``JobView`` fields)."""
BATCH = 500


@dataclass
class TopicSeen:
    records: int = 0
    unreadable: int = 0
    earliest_ms: int | None = None

    def saw(self, logged: LoggedRecord) -> None:
        self.records += 1
        self.earliest_ms = logged.timestamp_ms if self.earliest_ms is None else min(self.earliest_ms,
                                                                                    logged.timestamp_ms)


@dataclass
class RebuildReport:
    schema: str
    live_schema: str
    topics: dict[str, TopicSeen] = field(default_factory=dict)
    rebuilt_jobs: int = 0
    identical: int = 0
    differences: list[tuple[str, str, Any, Any]] = field(default_factory=list)
    """(job key, column, live value, rebuilt value) for every column that differs."""
    only_live: list[str] = field(default_factory=list)
    only_live_unpublished: int = 0
    """Of ``only_live``: never acknowledged by a broker (waiting for the outbox relay): no log holds them."""
    only_rebuilt: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """(job key, why) for each record the sink refused (the live store dead-lettered it too)."""

    @property
    def consistent(self) -> bool:
        return not self.differences and not self.only_rebuilt and self.only_live_unpublished == len(self.only_live)

    def to_json(self) -> dict[str, object]:
        return {"schema": self.schema, "live_schema": self.live_schema, "consistent": self.consistent,
                "topics": {name: {"records": seen.records, "unreadable": seen.unreadable,
                                  "earliest": None if seen.earliest_ms is None else seen.earliest_ms / 1000}
                           for name, seen in self.topics.items()},
                "rebuilt_jobs": self.rebuilt_jobs, "identical": self.identical,
                "differences": [{"job": k, "column": c, "live": lv, "rebuilt": rv}
                                for k, c, lv, rv in self.differences],
                "only_live": self.only_live, "only_live_unpublished": self.only_live_unpublished,
                "only_rebuilt": self.only_rebuilt,
                "rejected": [{"job": k, "why": w} for k, w in self.rejected]}


def check_schema(name: str, live: str) -> None:
    if not SCHEMA_NAME.fullmatch(name):
        raise ConfigError(f"--into-schema {name!r}: a schema name is lower-case letters, digits and _ "
                          "(at most 63, not starting with a digit)")
    if name == live:
        raise ConfigError(f"--into-schema {name!r} is the live schema: the rebuild needs a fresh one")


async def rebuild(dsn: str, live_schema: str, schema: str, bootstrap: str, topics: Topics, *, replace: bool = False,
                  progress: Progress | None = None) -> RebuildReport:
    """Rebuild the store from the log into ``schema`` (fresh: refused if it holds tables, unless
    ``replace``) and compare it with ``live_schema``."""
    from inferlog_store.sink import ResultSink  # the result-store's own code path (installed with it)

    check_schema(schema, live_schema)
    tell = progress or (lambda _phase, _n, _total: None)
    await _fresh(dsn, schema, replace)
    await migrate(dsn, schema)
    report = RebuildReport(schema, live_schema)
    pool = await connect_pool(dsn, schema, max_size=4)
    try:
        ledger = RequestLedger(pool)
        await _claim_requests(ledger, bootstrap, topics.requests, report, tell)
        await _apply_outcomes(ResultSink(pool), bootstrap, topics, report, tell)
        live_pool = await connect_pool(dsn, live_schema, max_size=2)
        try:
            await _compare(RequestLedger(live_pool), ledger, live_pool, pool, report, tell)
        finally:
            await live_pool.close()
    finally:
        await pool.close()
    return report


async def _fresh(dsn: str, schema: str, replace: bool) -> None:
    pool = await connect_pool(dsn, "public", max_size=1)
    try:
        tables = await pool.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = $1", schema)
        if tables and not replace:
            raise ConfigError(f"schema {schema} is not empty ({tables} tables): name a fresh one, or --replace it")
        if tables:
            await pool.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await pool.close()


async def _claim_requests(ledger: RequestLedger, bootstrap: str, topic: str, report: RebuildReport,
                          tell: Progress) -> None:
    """Each request record as the tokenizer claims one it reads (``on_log``), in log order per partition; a
    record the gateway published (it carries ``queued_at``) is then marked queued as the gateway did."""
    seen = report.topics.setdefault(topic, TopicSeen())
    async for batch in scan(bootstrap, topic):
        records = []
        for logged in batch:
            seen.saw(logged)
            try:
                records.append(RequestRecord.model_validate_json(logged.value or b""))
            except (ValidationError, ValueError):
                seen.unreadable += 1  # the tokenizer dead-lettered it: it is no job
        for start in range(0, len(records), BATCH):
            part = records[start:start + BATCH]
            outcomes = await ledger.claim_many(part, on_log=True)
            claimed = [r for r, o in zip(part, outcomes, strict=True) if not isinstance(o, IdempotencyConflict)]
            for record in claimed:
                if record.timings.queued_at is not None:
                    await ledger.mark_published(key_of(record), record.timings.queued_at)
        tell(f"reading {topic}", len(batch), None)


async def _apply_outcomes(sink: Any, bootstrap: str, topics: Topics, report: RebuildReport, tell: Progress) -> None:
    """Events and results through the result-store's sink, in the order the log appended them."""
    logged: list[tuple[int, int, LoggedRecord]] = []
    for order, topic in enumerate((topics.events, topics.results)):
        seen = report.topics.setdefault(topic, TopicSeen())
        async for batch in scan(bootstrap, topic):
            for record in batch:
                seen.saw(record)
                logged.append((record.timestamp_ms, order, record))
            tell(f"reading {topic}", len(batch), None)
    logged.sort(key=lambda item: (item[0], item[1], item[2].partition, item[2].offset))
    for start in range(0, len(logged), BATCH):
        events: list[EventRecord] = []
        results: list[ResultRecord] = []
        for _at, order, record in logged[start:start + BATCH]:
            try:
                if order == 0:
                    events.append(EventRecord.model_validate_json(record.value or b""))
                else:
                    results.append(ResultRecord.model_validate_json(record.value or b""))
            except (ValidationError, ValueError):
                report.topics[record.topic].unreadable += 1  # the store dead-lettered it
        for refused, exc in await sink.apply(events, results):
            report.rejected.append((refused.request_id, f"{type(exc).__name__}: {exc}"))
        tell("applying events and results", len(events) + len(results), len(logged))


async def _compare(live: RequestLedger, rebuilt: RequestLedger, live_pool: Any, pool: Any, report: RebuildReport,
                   tell: Progress) -> None:
    live_keys = {r["request_id"]: r["published"] for r in await live_pool.fetch(
        "SELECT request_id, published FROM requests")}
    rebuilt_keys = {r["request_id"] for r in await pool.fetch("SELECT request_id FROM requests")}
    report.rebuilt_jobs = len(rebuilt_keys)
    report.only_live = sorted(set(live_keys) - rebuilt_keys)
    report.only_live_unpublished = sum(1 for k in report.only_live if not live_keys[k])
    report.only_rebuilt = sorted(rebuilt_keys - set(live_keys))
    both = sorted(rebuilt_keys & set(live_keys))
    for start in range(0, len(both), BATCH):
        part = both[start:start + BATCH]
        lives = {v.request_id: v for v in await live.get_many(part)}
        rebuilts = {v.request_id: v for v in await rebuilt.get_many(part)}
        for key in part:
            diffs = _differences(lives[key], rebuilts[key])
            report.differences += [(key, column, a, b) for column, a, b in diffs]
            report.identical += not diffs
        tell("comparing", len(part), len(both))


def _differences(live: JobView, rebuilt: JobView) -> list[tuple[str, Any, Any]]:
    out = []
    for column in COMPARED:
        a, b = _plain(getattr(live, column)), _plain(getattr(rebuilt, column))
        if a != b:
            out.append((column, a, b))
    return out


def _plain(value: Any) -> Any:
    """A value as JSON shows it (a status enum as its text)."""
    return json.loads(json.dumps(value, default=str))
