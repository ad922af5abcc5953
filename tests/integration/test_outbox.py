"""The outbox relay produces only what something left unpublished on purpose (issue 8): a gateway's claim
whose produce was never acknowledged. A direct producer's record, claimed by the tokenizer, is on the log
already; so is a gateway's record once the tokenizer has read it (even if the gateway's own mark failed)."""

from __future__ import annotations

import uuid

import pytest

from inferlog.config import InferlogSettings
from inferlog.db import connect_pool, migrate
from inferlog.ledger import RequestLedger
from inferlog.messages import GenerationParams, RequestRecord
from tests.conftest import drop_schema

pytestmark = pytest.mark.integration


def _record(request_id: str, prompt: str = "hi") -> RequestRecord:
    return RequestRecord(request_id=request_id, model="m", prompt=prompt, params=GenerationParams(max_tokens=4))


async def test_the_relay_never_produces_a_record_that_is_on_the_log(settings: InferlogSettings) -> None:
    run = uuid.uuid4().hex[:8]
    direct, pending, lost_mark = f"direct-{run}", f"pending-{run}", f"lostmark-{run}"
    schema = f"{settings.postgres_schema}_outbox{run}"  # its own: the relay step takes every unpublished row
    await migrate(settings.postgres_url, schema)
    pool = await connect_pool(settings.postgres_url, schema)
    ledger = RequestLedger(pool)
    try:
        await ledger.claim_many([_record(direct)], on_log=True)  # the tokenizer, on a direct record
        await ledger.claim(_record(pending))  # a gateway whose produce was never acknowledged
        await ledger.claim(_record(lost_mark))  # a gateway whose produce landed, but whose mark failed...
        await ledger.claim_many([_record(lost_mark)], on_log=True)  # ...and the tokenizer read the record
        await ledger.claim_many([_record(pending, prompt="other")], on_log=True)  # a conflicting direct copy

        relayed: list[str] = []

        async def publish(records: list[RequestRecord]) -> None:
            relayed.extend(r.request_id for r in records)

        while await ledger.relay_unpublished(publish, older_than_s=0, limit=1000):
            pass
        assert relayed == [pending], "the relay produced a record that is on the log, or skipped one that is not"
    finally:
        await pool.close()
        await drop_schema(schema)


async def test_a_failed_relay_publish_raises_as_itself_and_the_claim_stays_for_the_next_step(
        settings: InferlogSettings) -> None:
    """A produce that times out inside the relay's transaction is the broker's error, never 'ledger
    unavailable'; the rows roll back, and the next step publishes them."""
    run = uuid.uuid4().hex[:8]
    pending = f"pending-{run}"
    schema = f"{settings.postgres_schema}_outboxfail{run}"
    await migrate(settings.postgres_url, schema)
    pool = await connect_pool(settings.postgres_url, schema)
    ledger = RequestLedger(pool)
    try:
        await ledger.claim(_record(pending))

        async def broker_down(records: list[RequestRecord]) -> None:
            raise TimeoutError

        with pytest.raises(TimeoutError):
            await ledger.relay_unpublished(broker_down, older_than_s=0)
        relayed: list[str] = []

        async def publish(records: list[RequestRecord]) -> None:
            relayed.extend(r.request_id for r in records)

        assert await ledger.relay_unpublished(publish, older_than_s=0) == 1
        assert relayed == [pending]
        assert await ledger.relay_unpublished(publish, older_than_s=0) == 0, "a published claim was relayed again"
    finally:
        await pool.close()
        await drop_schema(schema)
