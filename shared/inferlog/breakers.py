"""Circuit breakers around calls to Postgres and Redis (purgatory): closed → open after ``threshold``
consecutive failures → half-open after ``ttl_s`` (one trial call) → closed on success. While open, calls
fail at once with the caller's own "unavailable" error, so the caller's fallback runs without waiting on,
or hammering, a store that is down."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState


class CircuitBreaker:
    def __init__(self, name: str, *, threshold: int, ttl_s: float,
                 counts: Callable[[BaseException], bool] = lambda exc: True) -> None:
        """``counts`` says which exceptions are failures of the service (the others pass through uncounted)."""
        self._name = name
        self._factory = AsyncCircuitBreakerFactory(
            default_threshold=threshold, default_ttl=ttl_s, exclude=[(BaseException, lambda e: not counts(e))])

    @asynccontextmanager
    async def guard(self, opened: Callable[[], Exception]) -> AsyncIterator[None]:
        """Run the block through the breaker; while it is open, raise ``opened()`` instead."""
        breaker = await self._factory.get_breaker(self._name)
        try:
            async with breaker:
                yield
        except OpenedState as exc:
            raise opened() from exc
