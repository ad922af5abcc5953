"""Postgres: the connection pool and the versioned migrations.

Migrations are plain numbered SQL files in ``inferlog/migrations`` (``0001_initial.sql`` …), applied in order,
each in its own transaction, under an advisory lock so two processes starting at once apply each file once.
Every table lives in the configured schema (``INFERLOG_POSTGRES_SCHEMA``), set as the pool's search_path.
"""

from __future__ import annotations

import logging
import re
from importlib import resources

import asyncpg

from inferlog.breakers import CircuitBreaker
from inferlog.errors import StoreUnavailable

log = logging.getLogger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now, query cancelled
    asyncpg.InternalClientError,  # a connection left mid-operation by a server that went away
    asyncpg.exceptions.TransactionRollbackError,  # a deadlock or serialization failure: the retry succeeds
)
"""Postgres errors that say "not now" rather than "never": callers turn them into StoreUnavailable."""

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_KEY = 0x1F3E_10C0  # pg_advisory_xact_lock key for migrations


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) for each migration, in version order."""
    found = []
    for entry in resources.files("inferlog.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


async def connect_pool(dsn: str, schema: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections see ``schema`` first. Raises StoreUnavailable if Postgres does not answer."""
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=10,
            command_timeout=30,
            server_settings={"search_path": schema, "application_name": "inferlog"},
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise StoreUnavailable(f"Postgres at {_redact(dsn)} did not answer: {exc}") from exc
    assert pool is not None
    return pool


async def migrate(dsn: str, schema: str) -> list[str]:
    """Create ``schema`` if needed and apply the migrations it lacks. Returns the names applied."""
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise StoreUnavailable(f"Postgres at {_redact(dsn)} did not answer: {exc}") from exc
    applied: list[str] = []
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(f'SET LOCAL search_path TO "{schema}"')
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in migration_files():
                if version in done:
                    continue
                log.info("applying migration %s to schema %s", name, schema)
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
                applied.append(name)
    finally:
        await conn.close()
    return applied


def _redact(dsn: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", dsn)


class GuardedPool:
    """An asyncpg pool behind a circuit breaker (purgatory): after ``threshold`` consecutive connection
    failures the circuit opens and calls fail at once with StoreUnavailable for ``ttl_s`` (no hammering
    of a recovering Postgres); then one trial call half-opens it. Query errors (bad SQL, constraint
    violations) are not connection failures and do not count."""

    def __init__(self, pool: asyncpg.Pool, *, threshold: int = 5, ttl_s: float = 5.0) -> None:
        self._pool = pool
        self._breaker = CircuitBreaker("postgres", threshold=threshold, ttl_s=ttl_s,
                                       counts=lambda exc: isinstance(exc, TRANSIENT_ERRORS))

    async def _call(self, method: str, *args: object, **kwargs: object) -> object:
        async with self._breaker.guard(
                lambda: StoreUnavailable("Postgres circuit is open after repeated failures; retry later")):
            return await getattr(self._pool, method)(*args, **kwargs)

    async def fetch(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        return await self._call("fetch", *args, **kwargs)

    async def fetchrow(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        return await self._call("fetchrow", *args, **kwargs)

    async def fetchval(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        return await self._call("fetchval", *args, **kwargs)

    async def execute(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        return await self._call("execute", *args, **kwargs)

    def acquire(self):  # type: ignore[no-untyped-def]
        return _GuardedAcquire(self)

    async def close(self) -> None:
        await self._pool.close()


class _GuardedAcquire:
    def __init__(self, guarded: GuardedPool) -> None:
        self._guarded = guarded
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        self._conn = await self._guarded._call("acquire")  # type: ignore[assignment]
        assert self._conn is not None
        return self._conn

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if self._conn is not None:
            if exc_type is not None and not self._conn.is_closed():
                self._conn.terminate()  # it may be mid-operation: never hand it to the next caller
            await self._guarded._pool.release(self._conn)
