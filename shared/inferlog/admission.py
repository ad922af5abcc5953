"""The one admission module (DESIGN.md, contract 8): decides 202 / 429 / 503 for every submit, the
gateway's and ``inferlog submit``'s alike.

Signals: the ledger's count of accepted-but-not-terminal requests that can still finish (Little's L; the
broker's end offsets are unreliable here), per tier, globally and per tenant, whatever their source
(gateway, ``inferlog submit`` or a direct producer): jobs whose records were only on an earlier broker
epoch's log hold no slot (they wait for ``inferlog redrive``; a refusal says how many); store health (a
Postgres circuit that is open is a 503).

Interactive work is refused only when interactive work in flight reaches ``max_in_flight``: a batch backlog
never makes an interactive submit a 429. Batch work is shed first: it is refused once everything in flight
(both tiers) reaches ``batch_share`` of the limit. A tenant's limit holds within each tier. ``Retry-After``
is the estimated wait: the excess work divided by the measured output rate. Later signals (KV usage,
consumer lag, degradation levels) belong here, not beside it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from inferlog.config import InferlogSettings
from inferlog.errors import InferlogError
from inferlog.ledger import OpenCount, RequestLedger
from inferlog.messages import Priority

COUNT_TTL_S = 0.5
"""Counts are cached this long: admission costs one COUNT per half second, not one per submit."""
RATE_TTL_S = 5.0
MIN_RETRY_S, MAX_RETRY_S = 1, 60
FALLBACK_TOKENS_PER_S = 50.0
FALLBACK_TOKENS_PER_REQUEST = 128.0


class Overloaded(InferlogError):
    """Refused for load: 429 (slow down) with the estimated wait."""

    status_code = 429

    def __init__(self, message: str, retry_after_s: int, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.code = code


@dataclass(frozen=True)
class Limits:
    max_in_flight: int
    tenant_max_in_flight: int
    batch_share: float

    @classmethod
    def from_settings(cls, settings: InferlogSettings) -> Limits:
        return cls(settings.max_in_flight, settings.tenant_max_in_flight, settings.batch_share)

    def of(self, priority: Priority) -> int:
        """The tier's limit: interactive work's own count against ``max_in_flight``; batch work's, everything
        in flight against its share of it."""
        return self.max_in_flight if priority is Priority.INTERACTIVE else int(self.max_in_flight * self.batch_share)


class Admission:
    def __init__(self, ledger: RequestLedger, limits: Limits) -> None:
        self._ledger = ledger
        self._limits = limits
        self._counts: dict[str | None, tuple[float, OpenCount]] = {}
        self._rate: tuple[float, float, float] | None = None

    async def admit(self, tenant: str | None, priority: Priority) -> None:
        """Return if the submit may proceed; raise Overloaded (429), or StoreUnavailable (503)."""
        limits = self._limits
        everyone = await self._count(None)
        counted, limit = _held(everyone, priority), limits.of(priority)
        if counted >= limit:
            raise Overloaded(
                f"{counted} requests are in flight (limit {limit} for the {priority.value} tier); retry later."
                f"{_stranded(everyone)}",
                await self._retry_after(counted - limit + 1), "overloaded")
        if tenant is not None:
            theirs = await self._count(tenant)
            mine = _tier(theirs, priority)
            if mine >= limits.tenant_max_in_flight:
                raise Overloaded(
                    f"Your {mine} {priority.value} requests in flight reach your limit of "
                    f"{limits.tenant_max_in_flight}; retry when some finish.{_stranded(theirs)}",
                    await self._retry_after(mine - limits.tenant_max_in_flight + 1), "tenant_limit")

    async def room(self, tenant: str | None, priority: Priority) -> int:
        """How many more submits of this tier (and tenant) would be admitted now: what ``inferlog submit``
        feeds in as room frees, instead of being refused."""
        free = self._limits.of(priority) - _held(await self._count(None), priority)
        if tenant is not None:
            free = min(free, self._limits.tenant_max_in_flight - _tier(await self._count(tenant), priority))
        return max(0, free)

    def accepted(self, tenant: str | None, priority: Priority) -> None:
        """Count a just-accepted submit until the next refresh (so a burst cannot overshoot)."""
        batch = 1 if priority is Priority.BATCH else 0
        for key in {None, tenant}:
            if key in self._counts:
                at, count = self._counts[key]
                self._counts[key] = (at, OpenCount(count.in_flight + 1, count.awaiting_redrive, count.batch + batch))

    async def _count(self, tenant: str | None) -> OpenCount:
        cached = self._counts.get(tenant)
        if cached is not None and time.monotonic() - cached[0] < COUNT_TTL_S:
            return cached[1]
        count = await self._ledger.open_count(tenant)
        self._counts[tenant] = (time.monotonic(), count)
        return count

    async def _retry_after(self, excess_requests: int) -> int:
        if self._rate is None or time.monotonic() - self._rate[0] > RATE_TTL_S:
            tokens_per_s, tokens_per_request = await self._ledger.recent_throughput()
            self._rate = (time.monotonic(), tokens_per_s, tokens_per_request)
        _at, tokens_per_s, tokens_per_request = self._rate
        work = excess_requests * (tokens_per_request or FALLBACK_TOKENS_PER_REQUEST)
        wait = work / (tokens_per_s or FALLBACK_TOKENS_PER_S)
        return max(MIN_RETRY_S, min(MAX_RETRY_S, math.ceil(wait)))


def _tier(count: OpenCount, priority: Priority) -> int:
    """A tier's own jobs in flight."""
    return count.batch if priority is Priority.BATCH else count.in_flight - count.batch


def _held(count: OpenCount, priority: Priority) -> int:
    """What a tier's limit is held against: interactive, its own jobs; batch, every job in flight (the batch
    tier is shed first, so interactive load takes room from it, never the other way)."""
    return count.in_flight if priority is Priority.BATCH else _tier(count, priority)


def _stranded(count: OpenCount) -> str:
    if not count.awaiting_redrive:
        return ""
    return (f" ({count.awaiting_redrive} more accepted jobs of an earlier broker log are not counted: they wait "
            "for an operator's `inferlog redrive`.)")
