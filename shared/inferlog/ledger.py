"""The request ledger in Postgres: claiming jobs, and reading a job's status and result.

Rows are keyed by the job key (``inferlog.identity.job_key``: tenant and client ID), never by the client's
ID alone. A claim is ``INSERT … ON CONFLICT`` with the full payload and two hashes: ``payload_hash`` of
the record as published (defaults filled in) and, for gateway submits, ``request_hash`` of what the client
sent. The same job again is a claim whose either hash matches; a conflicting reuse matches neither.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg

from inferlog.db import TRANSIENT_ERRORS, GuardedPool
from inferlog.errors import ConfigError, IdempotencyConflict, StoreUnavailable
from inferlog.identity import client_id_of, job_key, sibling_key
from inferlog.messages import TERMINAL_RANK, DispatchFacts, RequestRecord, Status, now

_TRANSIENT = TRANSIENT_ERRORS


@contextmanager
def _translated() -> Iterator[None]:
    """asyncpg's connection errors become StoreUnavailable here, once for every query of the ledger."""
    try:
        yield
    except _TRANSIENT as exc:
        raise StoreUnavailable(f"ledger unavailable: {exc}") from exc


class _PublishFailed(Exception):
    """The relay's ``publish`` raised inside the ledger's transaction: re-raised as itself once it rolled back."""

    def __init__(self, error: Exception) -> None:
        super().__init__(repr(error))
        self.error = error


_MARK_QUEUED = """
UPDATE requests
   SET published = true,
       status = CASE WHEN status_rank < $2 THEN $3 ELSE status END,
       status_rank = GREATEST(status_rank, $2),
       timings = timings || jsonb_build_object('queued_at', $4::double precision),
       updated_at = now()
 WHERE request_id = ANY($1::text[])
"""
"""The broker has the records (a submit's own produce, or the outbox relay): they are queued."""


def payload_hash(record: RequestRecord) -> str:
    """Hash of what defines the job (not its ID, timings or deadline's receipt time)."""
    body = record.model_dump(
        mode="json", include={"model", "messages", "prompt", "params", "priority", "session_id", "tenant"}
    )
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def request_hash(sent: dict[str, Any], tenant: str | None) -> str:
    """Hash of what a client sent (its JSON body without the ID, and its tenant): unlike ``payload_hash``
    it does not change when the gateway's defaults (``max_tokens``, model) do."""
    body = {k: v for k, v in sent.items() if k != "request_id"}
    canonical = json.dumps({"body": body, "tenant": tenant}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def redrive_id(client_id: str, n: int) -> str:
    """The client ID of the ``n``-th re-drive of ``client_id``'s dead letters: ``<id>.redrive-<n>``, with a
    digest in place of the ID's tail when that would be over the client-ID limit (128)."""
    suffix = f".redrive-{n}"
    if len(client_id) + len(suffix) <= 128:
        return client_id + suffix
    digest = hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{client_id[:128 - len(suffix) - 13]}~{digest}{suffix}"


def key_of(record: RequestRecord) -> str:
    """The job key of a request record (its tenant and the client's ID)."""
    return job_key(record.tenant, record.request_id)


@dataclass(frozen=True)
class Claim:
    request_id: str
    """The job key."""
    created: bool
    """False when the ID was already claimed with the same payload (an idempotent replay)."""
    status: Status
    cancel_requested: bool = False


def store_text(text: str | None) -> tuple[str | None, bool]:
    """Generated text as the ``results.text`` column holds it, and whether it is escaped: Postgres text
    cannot hold NUL and asyncpg cannot send a lone surrogate, so such a text is kept as its JSON string
    (ASCII), which ``load_text`` turns back into exactly the same text."""
    if text is None:
        return None, False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(text), True
    return (json.dumps(text), True) if "\x00" in text else (text, False)


def load_text(stored: str | None, escaped: bool | None) -> str | None:
    return json.loads(stored) if escaped and stored is not None else stored


_COLD = ("chunks", "attempt")
"""JobView fields read from Postgres only, never written to the hot view."""


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
    redrive_of: str | None = None
    """The job key of the job whose dead letter this one was re-driven from (``inferlog dlq redrive``)."""
    redriven_as: tuple[str, ...] = ()
    """The job keys this job's dead letters were re-driven as, oldest first."""
    chunks: tuple[int, ...] | None = None
    """Where the text's streamed chunks ended (``ResultRecord.chunks``); read from Postgres only, never kept
    in the hot view (a stream resumed from the stored result reads it there)."""
    attempt: str | None = None
    """The attempt that streamed those chunks (``ResultRecord.attempt``); Postgres only, like ``chunks``."""

    @property
    def client_id(self) -> str:
        """The ID the client gave (``request_id`` is the job key)."""
        return client_id_of(self.request_id)

    def to_hot(self) -> dict[str, Any]:
        """The form kept in Redis (inferlog.hot.StatusCache)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _COLD}
        return {**fields, "status": self.status.value, "terminal": self.status.is_terminal(), "rank": self.status.rank}

    @classmethod
    def from_hot(cls, hot: dict[str, Any]) -> JobView:
        fields: dict[str, Any] = {f.name: hot.get(f.name) for f in dataclasses.fields(cls)}
        fields.update(status=Status(hot["status"]), timings=hot.get("timings") or {},
                      redriven_as=tuple(hot.get("redriven_as") or ()), chunks=None, attempt=None)
        return cls(**fields)


@dataclass(frozen=True)
class OpenCount:
    """Accepted jobs without a terminal result (``RequestLedger.open_count``)."""

    in_flight: int
    """Those that can still finish: on the current broker epoch's log, in the outbox, or running."""
    awaiting_redrive: int
    """Those whose records only an earlier broker epoch's log held: they wait for ``inferlog redrive``."""
    batch: int = 0
    """Of ``in_flight``, the batch tier's (the rest are interactive: a row with no priority counts there)."""


@dataclass(frozen=True)
class LedgerEntry:
    """One accepted job as an operator's command sees it (``RequestLedger.entries``)."""

    request_id: str
    """The job key."""
    tenant: str | None
    status: Status
    """The stored result's status if it has one, else the ledger's."""
    terminal: bool
    payload: str | None
    """The record as claimed (JSON); None for a row the result-store created on first sight of an ID."""
    deadline_at: float | None
    created_at: float
    redriven_epoch: str | None = None
    """The broker epoch ``inferlog redrive`` last re-published it into."""
    payload_hash: str | None = None
    """``payload_hash`` of the claimed record (what a claim compares: the job's identity beside its key)."""


class RequestLedger:
    """Claims and reads in the ledger; every asyncpg connection error becomes StoreUnavailable."""

    def __init__(self, pool: asyncpg.Pool | GuardedPool) -> None:
        self._pool = pool

    async def claim(self, record: RequestRecord, sent_hash: str | None = None) -> Claim:
        """Claim the record's job. Same job again: the existing one; another payload: 422.
        ``sent_hash``: ``request_hash`` of what the client sent (gateway submits)."""
        [outcome] = await self.claim_many([record], [sent_hash])
        if isinstance(outcome, IdempotencyConflict):
            raise outcome
        return outcome

    async def claim_many(self, records: list[RequestRecord], sent_hashes: list[str | None] | None = None, *,
                         on_log: bool = False) -> list[Claim | IdempotencyConflict]:
        """Claim each record's job in one round trip; per record, its Claim or the conflict it hit.

        A row the result-store created on first sight of an unclaimed job (no payload yet) is claimed too,
        unless it is already terminal (a broken record's ``failed`` result holds that key): then the key is
        taken, and claiming it is a conflict.

        ``on_log``: the records are on the requests topic already (the tokenizer claims a direct producer's
        records): their rows are published, so no outbox relay ever produces them again. A gateway claims
        before it produces (``on_log`` False): its row stays unpublished until the broker acknowledges.
        """
        digests = [payload_hash(r) for r in records]
        sent = sent_hashes or [None] * len(records)
        keys = [key_of(r) for r in records]
        firsts = list({k: (k, r, h) for k, r, h in reversed(list(zip(keys, records, sent, strict=True)))}.values())
        with _translated():
            async with self._pool.acquire() as conn, conn.transaction():
                created = {
                    row["request_id"]
                    for row in await conn.fetch(
                        f"""
                        INSERT INTO requests (request_id, payload, payload_hash, tenant, model, priority,
                                              status, status_rank, deadline_at, timings, request_hash, published)
                        SELECT *, $12::boolean FROM unnest($1::text[], $2::jsonb[], $3::text[], $4::text[],
                                             $5::text[], $6::text[], $7::text[], $8::smallint[], $9::float8[],
                                             $10::jsonb[], $11::text[])
                        ON CONFLICT (request_id) DO UPDATE
                            SET payload = EXCLUDED.payload, payload_hash = EXCLUDED.payload_hash,
                                tenant = EXCLUDED.tenant, model = EXCLUDED.model, priority = EXCLUDED.priority,
                                deadline_at = EXCLUDED.deadline_at, request_hash = EXCLUDED.request_hash,
                                published = requests.published OR EXCLUDED.published
                            WHERE requests.payload_hash IS NULL AND requests.status_rank < {TERMINAL_RANK}
                        RETURNING request_id
                        """,
                        [k for k, _r, _h in firsts],
                        [r.model_dump_json(exclude_none=True) for _k, r, _h in firsts],
                        [payload_hash(r) for _k, r, _h in firsts],
                        [r.tenant for _k, r, _h in firsts],
                        [r.model for _k, r, _h in firsts],
                        [r.priority.value for _k, r, _h in firsts],
                        [Status.RECEIVED.value] * len(firsts),
                        [Status.RECEIVED.rank] * len(firsts),
                        [r.deadline_at for _k, r, _h in firsts],
                        [r.timings.model_dump_json(exclude_none=True) for _k, r, _h in firsts],
                        [h for _k, _r, h in firsts],
                        on_log,
                    )
                }
                if on_log:  # a gateway's claim whose very record is on the log now is published too
                    await conn.execute(
                        "UPDATE requests SET published = true FROM unnest($1::text[], $2::text[]) AS t(k, h) "
                        "WHERE requests.request_id = t.k AND requests.payload_hash = t.h AND NOT requests.published",
                        keys, digests)
                existing = {
                    row["request_id"]: row
                    for row in await conn.fetch(
                        "SELECT request_id, payload_hash, request_hash, status, cancel_requested_at "
                        "FROM requests WHERE request_id = ANY($1::text[])", keys)
                }
        return [self._outcome(record, key, digest, sent_hash, existing[key], created=key in created)
                for record, key, digest, sent_hash in zip(records, keys, digests, sent, strict=True)]

    @staticmethod
    def _outcome(record: RequestRecord, key: str, digest: str, sent_hash: str | None, row: Any, *,
                 created: bool) -> Claim | IdempotencyConflict:
        same = created or row["payload_hash"] == digest or (
            sent_hash is not None and row["request_hash"] == sent_hash)
        if not same:
            return IdempotencyConflict(
                f"request_id {record.request_id!r} was already used with a different payload; "
                "use a new request_id (or Idempotency-Key) for a different job", param="request_id")
        return Claim(key, created=created, status=Status(row["status"]),
                     cancel_requested=row["cancel_requested_at"] is not None)

    async def existing_claim(self, record: RequestRecord, sent_hash: str | None) -> Claim | None:
        """The job this record names, if it is already claimed (a read: nothing is claimed). Raises
        IdempotencyConflict if the job exists with another payload, StoreUnavailable if unreadable."""
        key = key_of(record)
        with _translated():
            row = await self._pool.fetchrow(
                "SELECT payload_hash, request_hash, status, cancel_requested_at FROM requests "
                "WHERE request_id = $1 AND payload_hash IS NOT NULL", key)
        if row is None:
            return None
        outcome = self._outcome(record, key, payload_hash(record), sent_hash, row, created=False)
        if isinstance(outcome, IdempotencyConflict):
            raise outcome
        return outcome

    async def mark_published(self, request_id: str | list[str], queued_at: float) -> None:
        """The broker acknowledged the record (or each of a list): the job is queued."""
        keys = [request_id] if isinstance(request_id, str) else request_id
        with _translated():
            await self._pool.execute(_MARK_QUEUED, keys, Status.QUEUED.rank, Status.QUEUED.value, queued_at)

    async def relay_unpublished(self, publish: Callable[[list[RequestRecord]], Awaitable[None]], *,
                                older_than_s: float, limit: int = 200) -> int:
        """The outbox relay's step: publish claims the broker never acknowledged, then mark them published.

        Rows are locked (SKIP LOCKED) for the duration, so several gateways relay disjoint rows. If
        ``publish`` raises, the transaction rolls back and the rows stay unpublished for the next step.
        """
        try:
            return await self._relay_step(publish, older_than_s, limit)
        except _PublishFailed as failed:  # the broker's error, not the ledger's: the rows rolled back
            raise failed.error from None

    async def _relay_step(self, publish: Callable[[list[RequestRecord]], Awaitable[None]], older_than_s: float,
                          limit: int) -> int:
        with _translated():
            async with self._pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    """
                    SELECT request_id, payload FROM requests
                     WHERE published = false AND payload IS NOT NULL
                       AND created_at < now() - make_interval(secs => $1)
                     ORDER BY created_at LIMIT $2
                     FOR UPDATE SKIP LOCKED
                    """,
                    older_than_s, limit,
                )
                if not rows:
                    return 0
                queued_at = now()
                records = [RequestRecord.model_validate_json(row["payload"]) for row in rows]
                records = [r.model_copy(update={"timings": r.timings.merged(queued_at=queued_at)}) for r in records]
                try:
                    await publish(records)
                except Exception as exc:  # kept apart from the ledger's own errors (a produce timeout is no outage of Postgres)
                    raise _PublishFailed(exc) from exc
                await conn.execute(_MARK_QUEUED, [row["request_id"] for row in rows], Status.QUEUED.rank,
                                   Status.QUEUED.value, queued_at)
                return len(records)

    async def entries(self, *, since: float | None = None, until: float | None = None, open_only: bool = False,
                      keys: list[str] | None = None) -> list[LedgerEntry]:
        """Jobs claimed in ``[since, until]`` (Unix seconds, by claim time), or those of ``keys``; with
        ``open_only`` only those without a terminal result. Oldest first."""
        clauses, args = ["true"], []  # type: tuple[list[str], list[object]]
        for clause, value in (("q.created_at >= to_timestamp(${})", since), ("q.created_at <= to_timestamp(${})", until),
                              ("q.request_id = ANY(${}::text[])", keys)):
            if value is not None:
                args.append(value)
                clauses.append(clause.format(len(args)))
        if open_only:
            clauses.append(f"r.request_id IS NULL AND q.status_rank < {TERMINAL_RANK}")
        with _translated():
            rows = await self._pool.fetch(
                "SELECT q.request_id, q.tenant, COALESCE(r.status, q.status) AS status, "
                f"(r.request_id IS NOT NULL OR q.status_rank >= {TERMINAL_RANK}) AS terminal, q.payload, "
                "q.deadline_at, extract(epoch FROM q.created_at)::float8 AS created, q.redriven_epoch, q.payload_hash "
                f"FROM requests q LEFT JOIN results r USING (request_id) WHERE {' AND '.join(clauses)} "
                "ORDER BY q.created_at, q.request_id", *args)
        return [LedgerEntry(row["request_id"], row["tenant"], Status(row["status"]), row["terminal"], row["payload"],
                            row["deadline_at"], row["created"], row["redriven_epoch"], row["payload_hash"])
                for row in rows]

    async def mark_republished(self, records: list[RequestRecord], at: float, *, epoch: str | None = None) -> None:
        """An operator's command put these claimed jobs' records back on the log (the broker acknowledged):
        they are published and at least queued; the payload and deadline become the re-published record's
        (a new deadline is the only change ``payload_hash`` allows), and the re-publish is counted; a
        re-drive (``epoch``) records the broker epoch it published into."""
        with _translated():
            await self._pool.execute(
                """
                UPDATE requests q
                   SET published = true,
                       status = CASE WHEN q.status_rank < $4 THEN $5 ELSE q.status END,
                       status_rank = GREATEST(q.status_rank, $4),
                       payload = t.payload, deadline_at = t.deadline,
                       replays = q.replays + 1, replayed_at = $6, updated_at = now(),
                       redriven_epoch = COALESCE($7, q.redriven_epoch)
                  FROM unnest($1::text[], $2::jsonb[], $3::float8[]) AS t(k, payload, deadline)
                 WHERE q.request_id = t.k
                """,
                [key_of(r) for r in records], [r.model_dump_json(exclude_none=True) for r in records],
                [r.deadline_at for r in records], Status.QUEUED.rank, Status.QUEUED.value, at, epoch)

    async def reserve_redrive(self, dead_letter: str, original_key: str, digest: str, position: str,
                              at: float) -> tuple[str, bool]:
        """The job key dead letter ``dead_letter`` (its identity), which re-drives ``original_key``'s payload
        ``digest`` (``payload_hash``), is re-driven as, and whether this call reserved it (False: an earlier
        re-drive of this dead letter, or of another with the same job and payload, did). A new key is the
        original's client ID with ``.redrive-<n>``, the first ``n`` no job and no other re-drive holds;
        reserved before the new job is claimed, so a re-drive that stops between the two resumes with the
        same key."""
        client_id = client_id_of(original_key)
        with _translated():
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('dlq-redrive:' || $1))", original_key)
                existing = await conn.fetchval(
                    "SELECT redriven_key FROM dead_letter_redrives WHERE dead_letter = $1 OR "
                    "(original_key = $2 AND payload_hash = $3) ORDER BY dead_letter <> $1, at LIMIT 1",
                    dead_letter, original_key, digest)
                if existing is not None:
                    return existing, False
                n = int(await conn.fetchval(
                    "SELECT count(*) FROM dead_letter_redrives WHERE original_key = $1", original_key))
                while True:
                    n += 1
                    key = sibling_key(original_key, redrive_id(client_id, n))
                    taken = await conn.fetchval(
                        "SELECT EXISTS (SELECT 1 FROM requests WHERE request_id = $1) OR "
                        "EXISTS (SELECT 1 FROM dead_letter_redrives WHERE redriven_key = $1)", key)
                    if not taken:
                        break
                await conn.execute(
                    "INSERT INTO dead_letter_redrives (dead_letter, original_key, redriven_key, dlq_position, at, "
                    "payload_hash) VALUES ($1, $2, $3, $4, $5, $6)", dead_letter, original_key, key, position, at,
                    digest)
        return key, True

    async def redrives(self, dead_letters: list[str]) -> dict[str, str]:
        """For each of these dead letters (identities) already re-driven: the job key it became."""
        with _translated():
            rows = await self._pool.fetch(
                "SELECT dead_letter, redriven_key FROM dead_letter_redrives WHERE dead_letter = ANY($1::text[])",
                dead_letters)
        return {row["dead_letter"]: row["redriven_key"] for row in rows}

    async def redrives_of(self, original_keys: list[str]) -> dict[tuple[str, str], str]:
        """The re-drives reserved for these jobs: (original key, payload hash) → the job key it became (the
        first, should an older ledger hold several). Reservations made before payloads were recorded are
        left out."""
        with _translated():
            rows = await self._pool.fetch(
                "SELECT DISTINCT ON (original_key, payload_hash) original_key, payload_hash, redriven_key "
                "FROM dead_letter_redrives WHERE original_key = ANY($1::text[]) AND payload_hash IS NOT NULL "
                "ORDER BY original_key, payload_hash, at", original_keys)
        return {(row["original_key"], row["payload_hash"]): row["redriven_key"] for row in rows}

    async def redrive_origins(self, keys: list[str]) -> dict[str, str]:
        """For each of these job keys that is a re-drive of a dead letter: its original's key."""
        with _translated():
            rows = await self._pool.fetch(
                "SELECT redriven_key, original_key FROM dead_letter_redrives WHERE redriven_key = ANY($1::text[])",
                keys)
        return {row["redriven_key"]: row["original_key"] for row in rows}

    @asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        """Held by one operator's command at a time across every machine (a Postgres advisory lock on a
        connection kept for the duration); ConfigError if another holds it."""
        with _translated():
            async with self._pool.acquire() as conn:
                if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", f"inferlog:{name}"):
                    raise ConfigError(f"another `inferlog {name}` is running against this ledger; wait for it")
                try:
                    yield
                finally:
                    await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", f"inferlog:{name}")

    async def record_epoch(self, epoch: str, bootstrap: str, layout: dict[str, int], written_at: float) -> None:
        """The ledger's row of a broker epoch (``inferlog topics``); recording it again changes nothing."""
        with _translated():
            await self._pool.execute(
                "INSERT INTO broker_epochs (epoch, bootstrap, layout, written_at) VALUES ($1, $2, $3::jsonb, $4) "
                "ON CONFLICT (epoch) DO NOTHING", epoch, bootstrap, json.dumps(layout), written_at)

    async def latest_epoch(self) -> str | None:
        """The epoch recorded last (None before any)."""
        with _translated():
            return await self._pool.fetchval(  # type: ignore[no-any-return]
                "SELECT epoch FROM broker_epochs ORDER BY recorded_at DESC, written_at DESC LIMIT 1")

    async def request_cancel(self, request_id: str, at: float) -> JobView | None:
        """Set the durable cancel flag (first request wins); the job as it stands, or None if unknown."""
        with _translated():
            await self._pool.execute(
                "UPDATE requests SET cancel_requested_at = COALESCE(cancel_requested_at, $2) "
                "WHERE request_id = $1", request_id, at)
        return await self.get(request_id)

    async def dispatch_facts(self, request_ids: list[str]) -> dict[str, DispatchFacts]:
        """What a worker needs before an attempt, per job key, in one read: the stored terminal status (or
        None), how many engine failures the request was in, and whether a cancel was recorded (durably: the
        Redis flag is only the fast path)."""
        with _translated():
            rows = await self._pool.fetch(
                "SELECT k AS request_id, r.status, COALESCE(q.engine_failures, 0) AS engine_failures, "
                "q.cancel_requested_at IS NOT NULL AS cancelled "
                "FROM unnest($1::text[]) AS k LEFT JOIN results r ON r.request_id = k "
                "LEFT JOIN requests q ON q.request_id = k", request_ids)
        return {row["request_id"]: DispatchFacts(Status(row["status"]) if row["status"] else None,
                                                 int(row["engine_failures"]), bool(row["cancelled"]))
                for row in rows}

    async def record_engine_failure(self, request_ids: list[str]) -> None:
        """These requests were in an engine that failed (one more strike each)."""
        with _translated():
            # An upsert: a direct record's row may not exist yet (the store creates it on first sight).
            await self._pool.execute(
                "INSERT INTO requests (request_id, status, status_rank, engine_failures) "
                "SELECT k, $2, $3, 1 FROM unnest($1::text[]) AS k "
                "ON CONFLICT (request_id) DO UPDATE SET engine_failures = requests.engine_failures + 1",
                request_ids, Status.RUNNING.value, Status.RUNNING.rank)

    async def terminal_statuses(self, request_ids: list[str]) -> dict[str, Status]:
        """The stored terminal status of each of these requests that has one."""
        with _translated():
            rows = await self._pool.fetch(
                "SELECT request_id, status FROM results WHERE request_id = ANY($1::text[])", request_ids)
        return {row["request_id"]: Status(row["status"]) for row in rows}

    async def get(self, request_id: str) -> JobView | None:
        views = await self.get_many([request_id])
        return views[0] if views else None

    async def get_many(self, request_ids: list[str]) -> list[JobView]:
        with _translated():
            rows = await self._pool.fetch(
                """
                SELECT q.request_id, COALESCE(r.status, q.status) AS status,
                       COALESCE(r.model, q.model) AS model, r.model_version, r.text, r.text_escaped,
                       r.finish_reason,
                       r.prompt_tokens, r.completion_tokens, r.error, q.tenant, r.chunks, r.attempt,
                       q.timings || COALESCE(r.timings, '{}'::jsonb) AS timings,
                       (SELECT d.original_key FROM dead_letter_redrives d
                         WHERE d.redriven_key = q.request_id) AS redrive_of,
                       ARRAY(SELECT d.redriven_key FROM dead_letter_redrives d
                              WHERE d.original_key = q.request_id ORDER BY d.at, d.redriven_key) AS redriven_as
                  FROM requests q LEFT JOIN results r USING (request_id)
                 WHERE q.request_id = ANY($1::text[])
                """,
                request_ids,
            )
        return [
            JobView(
                request_id=row["request_id"],
                status=Status(row["status"]),
                model=row["model"],
                model_version=row["model_version"],
                text=load_text(row["text"], row["text_escaped"]),
                finish_reason=row["finish_reason"],
                prompt_tokens=row["prompt_tokens"],
                completion_tokens=row["completion_tokens"],
                error=json.loads(row["error"]) if row["error"] else None,
                timings=json.loads(row["timings"]),
                tenant=row["tenant"],
                redrive_of=row["redrive_of"],
                redriven_as=tuple(row["redriven_as"]),
                chunks=tuple(row["chunks"]) if row["chunks"] is not None else None,
                attempt=row["attempt"],
            )
            for row in rows
        ]

    async def open_count(self, tenant: str | None = None) -> OpenCount:
        """Accepted and not terminal (Little's L), everywhere or one tenant's, split in two: the jobs that can
        still finish, and those that cannot until re-driven: claimed before the latest broker epoch began
        and not re-driven into it (their records were on a log that is gone, DESIGN.md). Only the first
        hold admission slots."""
        tenant_clause = "" if tenant is None else "AND q.tenant = $1"
        with _translated():
            row = await self._pool.fetchrow(
                "WITH latest AS (SELECT epoch, written_at FROM broker_epochs "
                "                ORDER BY recorded_at DESC, written_at DESC LIMIT 1), "
                "open AS (SELECT (l.epoch IS NOT NULL AND q.created_at < to_timestamp(l.written_at) "
                "                 AND q.redriven_epoch IS DISTINCT FROM l.epoch) AS stranded, "
                "                 q.priority IS NOT DISTINCT FROM 'batch' AS batch "
                f"        FROM requests q LEFT JOIN latest l ON true WHERE q.status_rank < {TERMINAL_RANK} "
                f"        {tenant_clause}) "
                "SELECT count(*) FILTER (WHERE NOT stranded) AS live, count(*) FILTER (WHERE stranded) AS stranded, "
                "count(*) FILTER (WHERE NOT stranded AND batch) AS batch FROM open", *(() if tenant is None else (tenant,)))
        return OpenCount(int(row["live"]), int(row["stranded"]), int(row["batch"]))

    async def recent_throughput(self, window_s: float = 60.0) -> tuple[float, float]:
        """(output tokens per second, mean output tokens per request) over the last ``window_s``."""
        with _translated():
            row = await self._pool.fetchrow(
                "SELECT COALESCE(sum(completion_tokens), 0) AS tokens, count(*) AS n FROM results "
                "WHERE created_at > now() - make_interval(secs => $1) AND status = 'completed'", window_s)
        tokens, n = int(row["tokens"]), int(row["n"])
        return tokens / window_s, (tokens / n if n else 0.0)

    async def list_jobs(self, tenant: str | None, *, status: Status | None, since: float | None, limit: int,
                        cursor: tuple[float, str] | None) -> list[tuple[JobView, float]]:
        """A tenant's jobs, newest first, with each one's creation time (the keyset cursor)."""
        clauses: list[str] = ["q.tenant IS NOT DISTINCT FROM $1"]
        args: list[object] = [tenant]
        if status is not None:
            args.append(status.value)
            clauses.append(f"COALESCE(r.status, q.status) = ${len(args)}")
        if since is not None:
            args.append(since)
            clauses.append(f"q.created_at >= to_timestamp(${len(args)})")
        if cursor is not None:
            args += [cursor[0], cursor[1]]
            clauses.append(f"(q.created_at, q.request_id) < (to_timestamp(${len(args) - 1}), ${len(args)})")
        args.append(limit)
        with _translated():
            rows = await self._pool.fetch(
                f"SELECT q.request_id, extract(epoch FROM q.created_at)::float8 AS created "
                f"FROM requests q LEFT JOIN results r USING (request_id) WHERE {' AND '.join(clauses)} "
                f"ORDER BY q.created_at DESC, q.request_id DESC LIMIT ${len(args)}", *args)
        views = {v.request_id: v for v in await self.get_many([row["request_id"] for row in rows])}
        return [(views[row["request_id"]], row["created"]) for row in rows if row["request_id"] in views]

    async def usage(self, tenant: str | None) -> dict[str, int]:
        with _translated():
            row = await self._pool.fetchrow(
                "SELECT count(*) AS requests, COALESCE(sum(prompt_tokens), 0) AS prompt_tokens, "
                "COALESCE(sum(completion_tokens), 0) AS completion_tokens FROM results "
                "WHERE tenant IS NOT DISTINCT FROM $1", tenant)
        return {"requests": int(row["requests"]), "prompt_tokens": int(row["prompt_tokens"]),
                "completion_tokens": int(row["completion_tokens"])}

    async def ping(self) -> None:
        with _translated():
            await self._pool.fetchval("SELECT 1")
