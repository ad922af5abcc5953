"""Reading, waiting on and cancelling jobs: Redis first (hot status, notifications, deltas), Postgres as
the source of truth and the fallback whenever Redis misses or is down (DESIGN.md, contract 6)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import RedisError

from inferlog.breakers import CircuitBreaker
from inferlog.hot import CancelFlags, DeltaStream, StatusCache
from inferlog.ledger import JobView, RequestLedger
from inferlog.messages import now

log = logging.getLogger(__name__)

POLL_FALLBACK_S = 0.5
HOT_FRESH_S = 5.0
"""A hot view of a job still in progress older than this is checked against Postgres: the store's later
write (its terminal status) may have failed to reach Redis."""


class JobReader:
    def __init__(self, ledger: RequestLedger, hot: StatusCache | None = None, cancels: CancelFlags | None = None,
                 deltas: DeltaStream | None = None) -> None:
        self._ledger = ledger
        self._hot = hot
        self._cancels = cancels
        self._deltas = deltas
        # A Redis that hangs (not refusing, just silent) would cost every poll its socket timeout: after
        # three failures, skip Redis for ten seconds and go straight to the fallbacks.
        self._redis = CircuitBreaker("redis", threshold=3, ttl_s=10.0,
                                     counts=lambda exc: isinstance(exc, (RedisError, OSError)))

    def _guard(self):  # type: ignore[no-untyped-def]
        return self._redis.guard(lambda: RedisError("Redis circuit is open"))

    async def get(self, request_id: str) -> JobView | None:
        if self._hot is not None:
            try:
                async with self._guard():
                    hot = await self._hot.get(request_id)
                if hot is not None and (hot.get("terminal") or now() - float(hot.get("hot_at", 0)) < HOT_FRESH_S):
                    return JobView.from_hot(hot)
            except (RedisError, OSError) as exc:
                log.warning("hot status unavailable, reading Postgres: %s", exc)
        return await self._ledger.get(request_id)

    async def wait(self, request_id: str, wait_s: float) -> JobView | None:
        """The job once terminal, or as it stands after ``wait_s``. Holds no worker resource: it waits on
        the result-store's Redis notification (or, with Redis down, polls Postgres)."""
        job = await self.get(request_id)
        if job is None or job.status.is_terminal() or wait_s <= 0:
            return job

        async def terminal_in_store() -> bool:
            view = await self._ledger.get(request_id)
            return view is not None and view.status.is_terminal()

        try:
            if self._hot is None:
                raise RedisError("no Redis configured")
            async with self._guard():
                await self._hot.wait_done(request_id, wait_s, terminal_in_store)
        except (RedisError, OSError):
            deadline = asyncio.get_running_loop().time() + wait_s
            while asyncio.get_running_loop().time() < deadline and not await terminal_in_store():
                await asyncio.sleep(POLL_FALLBACK_S)
        return await self._ledger.get(request_id)

    async def cancel(self, request_id: str) -> JobView | None:
        """Flag the job cancelled in the ledger (durable) and notify the workers (Redis). The stage that
        holds the job then ends it ``cancelled``; a job already terminal stays as it is."""
        job = await self._ledger.request_cancel(request_id, now())
        if job is not None and not job.status.is_terminal() and self._cancels is not None:
            try:
                async with self._guard():
                    await self._cancels.raise_flag(request_id)
            except (RedisError, OSError) as exc:
                log.warning("cancel of %s recorded in the ledger only (Redis: %s)", request_id, exc)
        return job

    async def stream(self, request_id: str, view: JobView) -> AsyncIterator[str]:
        """Server-Sent Events: ``delta`` events with the text so far, then the rest as it is generated, then
        one ``done`` event with the terminal status. Without Redis it degrades to waiting for the result."""
        if self._deltas is None:
            async for event in self._stream_from_store(request_id, view):
                yield event
            return
        last = "0"
        try:
            while True:
                async with self._guard():
                    entries = await self._deltas.read(request_id, last, block_ms=1000)
                for entry_id, fields in entries:
                    last = entry_id
                    if "d" in fields:
                        yield _sse("delta", {"text": fields["d"]})
                    if "end" in fields:
                        yield _sse("done", {"status": fields["end"], "finish_reason": fields.get("finish_reason"),
                                            "completion_tokens": int(fields.get("completion_tokens") or 0)})
                        return
                if not entries:  # ended without a stream (refused, failed early, or Redis lost it)?
                    current = await self._ledger.get(request_id)
                    if current is not None and current.status.is_terminal():
                        if last == "0" and current.text:
                            yield _sse("delta", {"text": current.text})
                        yield _sse("done", _done_fields(current))
                        return
        except (RedisError, OSError) as exc:
            log.warning("stream of %s degrades to polling: %s", request_id, exc)
            async for event in self._stream_from_store(request_id, view, sent_any=last != "0"):
                yield event

    async def _stream_from_store(self, request_id: str, view: JobView, sent_any: bool = False) -> AsyncIterator[str]:
        job = await self.wait(request_id, 3600) or view
        if job.text and not sent_any:
            yield _sse("delta", {"text": job.text})
        yield _sse("done", _done_fields(job))


def _done_fields(job: JobView) -> dict[str, Any]:
    return {"status": job.status.value, "finish_reason": job.finish_reason,
            "completion_tokens": job.completion_tokens or 0}


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
