"""A failed commit (a rebalance, or this member dropped after a long outage) never stops the in-order
consumer loop of the tokenizer and the result-store: it used to exit the process."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError

from inferlog.consume import run_in_order


async def test_a_failed_commit_is_logged_and_the_loop_goes_on() -> None:
    tp = TopicPartition("t", 0)
    batches = [{tp: [SimpleNamespace(offset=0)]}, {tp: [SimpleNamespace(offset=1)]}]
    handled: list[int] = []
    commits: list[Any] = []
    stop = asyncio.Event()

    class Consumer:
        async def getmany(self, timeout_ms: int, max_records: int) -> dict[Any, Any]:
            if batches:
                return batches.pop(0)
            stop.set()
            return {}

        async def commit(self, offsets: Any) -> None:
            commits.append(offsets)
            if len(commits) == 1:
                raise CommitFailedError("the group rebalanced")

    async def handle(records: list[Any]) -> None:
        handled.extend(r.offset for r in records)

    await asyncio.wait_for(run_in_order(Consumer(), handle, stop), timeout=5)  # type: ignore[arg-type]
    assert handled == [0, 1] and len(commits) == 2
