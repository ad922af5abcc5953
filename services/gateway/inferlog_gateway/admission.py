"""The one admission module (DESIGN.md, contract 8): decides 202 / 429 / 503 for every submit.

Signals: the ledger's count of accepted-but-not-terminal requests that can still finish (Little's L; the
broker's end offsets are unreliable here), globally and per tenant: jobs whose records were only on an
earlier broker epoch's log hold no slot (they wait for ``inferlog redrive``; a refusal says how many); store health (a Postgres circuit that is open is a 503).
The batch tier is shed first: it is refused at ``batch_share`` of the global limit, interactive work at
the limit. ``Retry-After`` is the estimated wait: the excess work divided by the measured output rate.
Later signals (KV usage, consumer lag, degradation levels) belong here, not beside it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

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


class Admission:
    def __init__(self, ledger: RequestLedger, limits: Limits) -> None:
        self._ledger = ledger
        self._limits = limits
        self._counts: dict[str | None, tuple[float, OpenCount]] = {}
        self._rate: tuple[float, float, float] | None = None

    async def admit(self, tenant: str | None, priority: Priority) -> None:
        """Return if the submit may proceed; raise Overloaded (429), or StoreUnavailable (503)."""
        limits = self._limits
        in_flight = await self._count(None)
        limit = limits.max_in_flight if priority is Priority.INTERACTIVE else int(
            limits.max_in_flight * limits.batch_share)
        if in_flight.in_flight >= limit:
            raise Overloaded(
                f"{in_flight.in_flight} requests are in flight (limit {limit} for the {priority.value} tier); "
                f"retry later.{_stranded(in_flight)}", await self._retry_after(in_flight.in_flight - limit + 1),
                "overloaded")
        if tenant is not None:
            mine = await self._count(tenant)
            if mine.in_flight >= limits.tenant_max_in_flight:
                raise Overloaded(
                    f"Your {mine.in_flight} requests in flight reach your limit of {limits.tenant_max_in_flight}; "
                    f"retry when some finish.{_stranded(mine)}",
                    await self._retry_after(mine.in_flight - limits.tenant_max_in_flight + 1), "tenant_limit")

    def accepted(self, tenant: str | None) -> None:
        """Count a just-accepted submit until the next refresh (so a burst cannot overshoot)."""
        for key in {None, tenant}:
            if key in self._counts:
                at, count = self._counts[key]
                self._counts[key] = (at, OpenCount(count.in_flight + 1, count.awaiting_redrive))

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


def _stranded(count: OpenCount) -> str:
    if not count.awaiting_redrive:
        return ""
    return (f" ({count.awaiting_redrive} more accepted jobs of an earlier broker log are not counted: they wait "
            "for an operator's `inferlog redrive`.)")
