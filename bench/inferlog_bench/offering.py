"""How every backend that serves one request at a time is offered a workload: a warm-up batch, then each
request at its arrival time, at most ``slots`` in the backend at once, timed the same way for all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from inferlog_bench.results import RequestRun, Run
from inferlog_bench.workloads import Workload


@dataclass(frozen=True)
class Served:
    """One request's outcome as a backend returns it."""

    tokens: int
    text: str | None
    token_ids: list[int] | None
    first_at: float | None
    """``time.perf_counter()`` when its first output token came (None: no token)."""


async def offer(backend: str, work: Workload, serve: Callable[[int], Awaitable[Served]], *, slots: int | None,
                warm: Callable[[int], Awaitable[object]], warm_count: int) -> Run:
    """``warm(k)`` for ``warm_count`` requests at once (a cold batched prefill costs seconds more than a warm
    one), then ``serve(i)`` for each request of ``work`` from its arrival on. ``slots``: how many the backend
    is given at once, as the worker admits (None: all, the backend queues). TTFT runs from the arrival, so a
    request that waits for a slot pays the wait, as a user would."""
    await asyncio.gather(*(warm(k) for k in range(warm_count)))
    gate = asyncio.Semaphore(slots or len(work))
    started = time.perf_counter()

    async def one(i: int) -> RequestRun:
        await asyncio.sleep(max(0.0, work.arrivals[i] - (time.perf_counter() - started)))
        async with gate:
            served = await serve(i)
        done = time.perf_counter() - started
        first = served.first_at - started if served.first_at is not None else done
        return RequestRun(served.tokens, served.text, served.token_ids, max(0.0, first - work.arrivals[i]), done)

    runs = await asyncio.gather(*(one(i) for i in range(len(work))))
    return Run(backend, work.name, max(r.done_s for r in runs), list(runs))


def perf_time_of(wall: float) -> float:
    """A ``time.time()`` instant on the ``time.perf_counter()`` clock."""
    return time.perf_counter() - (time.time() - wall)
