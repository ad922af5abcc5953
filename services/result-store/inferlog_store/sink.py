"""ResultSink: applies events and results to Postgres, idempotently.

- Status only moves forward: an update whose rank is not above the stored one changes nothing.
- The first terminal result wins: ``results`` is insert-only (ON CONFLICT DO NOTHING), and once a request's
  status is terminal its status and timings are final.
- A request the ledger has never seen (a direct producer's record) gets a row on first sight.

Applying the same batch twice has the same effect as applying it once, which is what lets the consumer
commit offsets only after the transaction and re-read safely after a crash.

A record Postgres can never take (a data error: NUL in an identifier, an index row over its limit) is not
an outage: the batch is applied again one record at a time, and those that fail alone are returned as
rejected, for the handler to dead-letter, so one record never stops the store. Generated text is stored
faithfully whatever its characters (``ledger.store_text``).
"""

from __future__ import annotations

import json

import asyncpg

from inferlog.db import TRANSIENT_ERRORS
from inferlog.errors import StoreUnavailable
from inferlog.ledger import store_text
from inferlog.messages import TERMINAL_RANK, EventRecord, ResultRecord

_TRANSIENT = TRANSIENT_ERRORS

_ADVANCE_STATUS = f"""
INSERT INTO requests (request_id, status, status_rank, model, tenant, timings)
VALUES ($1, $2, $3, $4, $5, $6::jsonb)
ON CONFLICT (request_id) DO UPDATE SET
    status      = CASE WHEN requests.status_rank < EXCLUDED.status_rank THEN EXCLUDED.status
                       ELSE requests.status END,
    timings     = CASE WHEN requests.status_rank < {TERMINAL_RANK} THEN requests.timings || EXCLUDED.timings
                       ELSE requests.timings END,
    status_rank = GREATEST(requests.status_rank, EXCLUDED.status_rank),
    updated_at  = now()
"""

_INSERT_RESULT = """
INSERT INTO results (request_id, status, model, model_version, text, text_escaped, finish_reason,
                     prompt_tokens, completion_tokens, error, worker_id, tenant, timings, chunks, attempt)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11, $12, $13::jsonb, $14::integer[], $15)
ON CONFLICT (request_id) DO NOTHING
"""

_REJECTED = (asyncpg.DataError, asyncpg.ProgramLimitExceededError, asyncpg.IntegrityConstraintViolationError,
             UnicodeEncodeError)
"""Errors of one record, never of the store: retrying cannot help."""

Rejected = list[tuple[EventRecord | ResultRecord, Exception]]


def _error_json(result: ResultRecord) -> str | None:
    """The error as jsonb takes it: an error message is not data, so a NUL in it (which jsonb cannot hold)
    is kept as the visible six characters ``\\u0000``."""
    if result.error is None:
        return None
    fields = result.error.model_dump(exclude_none=True)
    return json.dumps({k: v.replace("\x00", "\\u0000") if isinstance(v, str) else v for k, v in fields.items()})


class ResultSink:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def apply(self, events: list[EventRecord], results: list[ResultRecord]) -> Rejected:
        """Apply a batch; return the records Postgres rejected (each alone), with why. Raises
        StoreUnavailable when Postgres does not answer (nothing of the batch is then known to be applied)."""
        try:
            await self._apply(events, results)
            return []
        except _REJECTED as exc:
            if len(events) + len(results) == 1:
                return [((events or results)[0], exc)]
        rejected: Rejected = []
        for result in results:  # results first, as in a batch: the winning result sets the status
            rejected += await self.apply([], [result])
        for event in events:
            rejected += await self.apply([event], [])
        return rejected

    async def _apply(self, events: list[EventRecord], results: list[ResultRecord]) -> None:
        """Apply a batch in one transaction."""
        status_rows: list[tuple[str, str, int, str | None, str | None, str]] = [
            (e.request_id, e.status.value, e.status.rank, None, None, e.timings.model_dump_json(exclude_none=True))
            for e in events
        ]
        status_rows += [
            (r.request_id, r.status.value, r.status.rank, r.model, r.tenant,
             r.timings.model_dump_json(exclude_none=True))
            for r in results
        ]
        result_rows = [
            (
                r.request_id, r.status.value, r.model, r.model_version, *store_text(r.text), r.finish_reason,
                r.usage.prompt_tokens, r.usage.completion_tokens, _error_json(r),
                r.worker_id, r.tenant, r.timings.model_dump_json(exclude_none=True), r.chunks, r.attempt,
            )
            for r in results
        ]
        # One lock order for every writer: concurrent sinks never deadlock on each other's rows.
        status_rows.sort(key=lambda row: row[0])
        result_rows.sort(key=lambda row: row[0])
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                # Results first: the row that wins the insert is the one whose status the ledger shows.
                if result_rows:
                    await conn.executemany(_INSERT_RESULT, result_rows)
                if status_rows:
                    await conn.executemany(_ADVANCE_STATUS, status_rows)
        except _TRANSIENT as exc:
            raise StoreUnavailable(f"result store unavailable: {exc}") from exc
