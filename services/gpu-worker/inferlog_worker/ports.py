"""What the worker's dispatch core talks to, as small protocols: the log (fetched records, finish and
commit), the publisher (acknowledged produce), the ledger, the leases, the cancel flags, the delta stream,
the load report and the engine. Nothing here imports a transport: the Kafka/Redis shell
(``inferlog_worker.shell``) adapts aiokafka, redis and asyncpg to these, and translates their errors into
``inferlog.errors`` once, at the boundary; the tests use in-memory fakes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel

from inferlog.leasing import LeaseState
from inferlog.messages import DispatchFacts, Status

Position = tuple[str, int]
"""(topic, partition) of a fetched record; aiokafka's TopicPartition is one (a named tuple)."""
Outgoing = tuple[str, str | None, BaseModel]
"""(topic, key, record) to publish."""


class Publisher(Protocol):
    """Publish records and return once the broker acknowledged all of them (retrying an outage meanwhile)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def __call__(self, outgoing: list[Outgoing]) -> None: ...


class FetchedRecord(Protocol):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class LogPort(Protocol):
    """The worker's tiers: fetch what admission has room for, finish records, commit watermarks."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def fetch(self, max_records: int, timeout_ms: int = 50) -> list[FetchedRecord]: ...
    def finish(self, tp: Position, offset: int) -> None: ...
    async def commit(self, only: set[Position] | None = None) -> dict[Position, int]: ...
    def pause_all(self) -> None: ...
    def resume_only(self, topics: set[str]) -> None:
        """Fetch from these topics' partitions only; the others are paused (still polled)."""
        ...
    def assignment(self) -> set[Position]: ...


class LedgerPort(Protocol):
    async def dispatch_facts(self, request_ids: list[str]) -> dict[str, DispatchFacts]: ...
    async def terminal_statuses(self, request_ids: list[str]) -> dict[str, Status]: ...
    async def record_engine_failure(self, request_ids: list[str]) -> None: ...


class LeasePort(Protocol):
    """Generation leases (``inferlog.hot.Leases``); every call raises SideChannelUnavailable on an outage."""

    ttl_ms: int

    def new_value(self) -> str: ...
    async def acquire_many(self, wanted: dict[str, str]) -> set[str]: ...
    async def state_of(self, request_id: str) -> tuple[LeaseState, str | None]: ...
    async def renew_many(self, held: dict[str, str]) -> dict[str, int]: ...
    async def mark_done(self, request_id: str, value: str) -> bool: ...
    async def release(self, request_id: str, value: str) -> None: ...
    async def release_many(self, held: dict[str, str]) -> None: ...


class CancelPort(Protocol):
    async def flagged(self, request_ids: list[str]) -> set[str]: ...


class DeltaPort(Protocol):
    async def append_many(self, deltas: list[tuple[str, dict[str, str]]]) -> None: ...


@dataclass(frozen=True)
class LoadSnapshot:
    worker_id: str
    model: str
    model_version: str
    running: int
    """Requests the engine is prefilling or decoding now (its running batch)."""
    admitted: int
    """Requests handed to the engine and not yet finished (running plus queued inside it)."""
    waiting: int
    """Fetched records waiting for KV capacity."""
    tokens_in_flight: int
    free_kv_blocks: int
    total_kv_blocks: int
    partitions: list[str]
    watching: int = 0
    """Requests another worker's lease holds, watched here (offsets kept uncommitted)."""
    in_preflight: int = 0
    """Admitted requests in preflight or recording their attempt (not yet in the engine)."""
    revoked_in_preflight: int = 0
    """Cumulative: admitted requests whose partition was revoked before they reached the engine."""
    takeovers: int = 0
    """Cumulative: requests taken over after another worker's lease expired."""

    def fields(self) -> dict[str, str]:
        return {
            "worker_id": self.worker_id, "model": self.model, "model_version": self.model_version,
            "running": str(self.running), "admitted": str(self.admitted), "waiting": str(self.waiting),
            "tokens_in_flight": str(self.tokens_in_flight), "free_kv_blocks": str(self.free_kv_blocks),
            "total_kv_blocks": str(self.total_kv_blocks), "partitions": json.dumps(self.partitions),
            "watching": str(self.watching), "in_preflight": str(self.in_preflight),
            "revoked_in_preflight": str(self.revoked_in_preflight), "takeovers": str(self.takeovers),
            "updated_at": f"{time.time():.3f}",
        }


class LoadPort(Protocol):
    async def publish(self, snapshot: LoadSnapshot) -> None: ...
    async def remove(self, worker_id: str) -> None: ...
