"""The outbox relay is supervised: an unexpected error in a step is logged and retried (and /readyz shows
the relay unhealthy meanwhile), never a silently dead task; and a submit whose record the broker has
acknowledged is accepted even when marking it published fails."""

from __future__ import annotations

import asyncio
from typing import Any

from inferlog.errors import StoreUnavailable
from inferlog.messages import GenerationParams, RequestRecord, Status
from inferlog.publishing import OutboxRelay, Submitter
from inferlog.topics import Topics


async def test_an_unexpected_error_makes_the_relay_unhealthy_not_dead() -> None:
    steps: list[str] = []

    class Ledger:
        async def relay_unpublished(self, publish: Any, *, older_than_s: float) -> int:
            steps.append("step")
            if len(steps) == 1:
                raise ValueError("a row this code cannot read")
            return 0

    relay = OutboxRelay(Ledger(), None, interval_s=0.001, grace_s=0, timeout_s=1)  # type: ignore[arg-type]
    task = asyncio.create_task(relay.run())
    await asyncio.sleep(0.001)
    assert not relay.healthy and not task.done()
    for _ in range(200):
        await asyncio.sleep(0.01)
        if relay.healthy:
            break
    assert relay.healthy and len(steps) >= 2 and not task.done()
    task.cancel()


async def test_a_record_the_broker_acknowledged_is_accepted_even_if_the_mark_fails() -> None:
    class Ledger:
        async def claim(self, record: RequestRecord, sent_hash: str | None) -> Any:
            from inferlog.ledger import Claim
            return Claim(record.request_id, created=True, status=Status.RECEIVED)

        async def mark_published(self, request_id: str, queued_at: float) -> None:
            raise StoreUnavailable("postgres went away after the produce")

    produced: list[Any] = []
    submitter = Submitter(Ledger(), None, Topics("p", 1), timeout_s=1)  # type: ignore[arg-type]

    async def publish(records: list[RequestRecord]) -> None:
        produced.extend(records)

    submitter.publish = publish  # type: ignore[method-assign]
    claim = await submitter.submit(RequestRecord(request_id="r", model="m", prompt="hi",
                                                 params=GenerationParams(max_tokens=4)))
    assert claim.created and claim.status is Status.QUEUED and len(produced) == 1
