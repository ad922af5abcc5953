"""The request ledger in Postgres: claiming request IDs, and reading a job's status and result.

A claim is ``INSERT … ON CONFLICT DO NOTHING`` with the full payload and its hash, so the ledger alone
decides whether an ID is new, the same job again, or a conflicting reuse.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import asyncpg

from inferlog.errors import IdempotencyConflict, StoreUnavailable
from inferlog.messages import RequestRecord, Status

_TRANSIENT = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, TimeoutError)


def payload_hash(record: RequestRecord) -> str:
    """Hash of what defines the job (not its ID, timings or deadline's receipt time)."""
    body = record.model_dump(
        mode="json", include={"model", "messages", "prompt", "params", "priority", "session_id", "tenant"}
    )
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Claim:
    request_id: str
    created: bool
    """False when the ID was already claimed with the same payload (an idempotent replay)."""
    status: Status


@dataclass(frozen=True)
class JobView:
    """What a poll returns about one job."""

    request_id: str
    status: Status
    model: str | None
    model_version: str | None
    text: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    error: dict[str, Any] | None
    timings: dict[str, float]
    tenant: str | None


class RequestLedger:
    """Claims and reads in the ledger; every asyncpg connection error becomes StoreUnavailable."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def claim(self, record: RequestRecord) -> Claim:
        """Claim ``record.request_id``. Same ID and payload: the existing job; another payload: 422."""
        digest = payload_hash(record)
        try:
            row = await self._pool.fetchrow(
                """
                INSERT INTO requests (request_id, payload, payload_hash, tenant, model, priority,
                                      status, status_rank, deadline_at, timings)
                VALUES ($1, $2::jsonb, $3, $4, $5, $6, $7, $8, $9, $10::jsonb)
                ON CONFLICT (request_id) DO NOTHING
                RETURNING request_id
                """,
                record.request_id,
                record.model_dump_json(exclude_none=True),
                digest,
                record.tenant,
                record.model,
                record.priority.value,
                Status.RECEIVED.value,
                Status.RECEIVED.rank,
                record.deadline_at,
                record.timings.model_dump_json(exclude_none=True),
            )
            if row is not None:
                return Claim(record.request_id, created=True, status=Status.RECEIVED)
            existing = await self._pool.fetchrow(
                "SELECT payload_hash, status FROM requests WHERE request_id = $1", record.request_id
            )
        except _TRANSIENT as exc:
            raise StoreUnavailable(f"ledger unavailable: {exc}") from exc
        if existing is None:  # released between our insert and select: the caller may retry
            raise StoreUnavailable("claim raced with a release; retry")
        if existing["payload_hash"] != digest:
            raise IdempotencyConflict(
                f"request_id {record.request_id!r} was already used with a different payload; "
                "use a new request_id (or Idempotency-Key) for a different job",
                param="request_id",
            )
        return Claim(record.request_id, created=False, status=Status(existing["status"]))

    async def mark_published(self, request_id: str, queued_at: float) -> None:
        """The broker acknowledged the record: the job is queued."""
        try:
            await self._pool.execute(
                """
                UPDATE requests
                   SET published = true,
                       status = CASE WHEN status_rank < $2 THEN $3 ELSE status END,
                       status_rank = GREATEST(status_rank, $2),
                       timings = timings || jsonb_build_object('queued_at', $4::double precision),
                       updated_at = now()
                 WHERE request_id = $1
                """,
                request_id,
                Status.QUEUED.rank,
                Status.QUEUED.value,
                queued_at,
            )
        except _TRANSIENT as exc:
            raise StoreUnavailable(f"ledger unavailable: {exc}") from exc

    async def release(self, request_id: str) -> None:
        """Undo a claim whose record never reached the broker, so the client may submit it again."""
        try:
            await self._pool.execute(
                "DELETE FROM requests WHERE request_id = $1 AND published = false", request_id
            )
        except _TRANSIENT as exc:
            raise StoreUnavailable(f"ledger unavailable: {exc}") from exc

    async def get(self, request_id: str) -> JobView | None:
        try:
            row = await self._pool.fetchrow(
                """
                SELECT q.request_id, COALESCE(r.status, q.status) AS status,
                       COALESCE(r.model, q.model) AS model, r.model_version, r.text, r.finish_reason,
                       r.prompt_tokens, r.completion_tokens, r.error, q.tenant,
                       q.timings || COALESCE(r.timings, '{}'::jsonb) AS timings
                  FROM requests q LEFT JOIN results r USING (request_id)
                 WHERE q.request_id = $1
                """,
                request_id,
            )
        except _TRANSIENT as exc:
            raise StoreUnavailable(f"ledger unavailable: {exc}") from exc
        if row is None:
            return None
        return JobView(
            request_id=row["request_id"],
            status=Status(row["status"]),
            model=row["model"],
            model_version=row["model_version"],
            text=row["text"],
            finish_reason=row["finish_reason"],
            prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"],
            error=json.loads(row["error"]) if row["error"] else None,
            timings=json.loads(row["timings"]),
            tenant=row["tenant"],
        )

    async def ping(self) -> None:
        try:
            await self._pool.fetchval("SELECT 1")
        except _TRANSIENT as exc:
            raise StoreUnavailable(f"ledger unavailable: {exc}") from exc
