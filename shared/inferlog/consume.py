"""The in-order consumer loop of the tokenizer and the result-store.

Their records finish in fetch order, so a batch is: fetch, hand every record on durably (the handler
returns only after the broker or Postgres acknowledged its output), then commit each partition past the
batch. A crash between the two re-reads the batch, which the idempotent sinks absorb. Records that can
never succeed are the handler's to dead-letter; an outage is waited out with nothing committed; a failed
commit (a rebalance) is logged and the batch is read again by the partition's owner.

(FastStream's Kafka subscriber would do the same; this loop is kept to aiokafka so every service has
one explicit ack policy and the same consumer settings.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from inferlog.errors import RetryableError

log = logging.getLogger(__name__)

BatchHandler = Callable[[list[ConsumerRecord]], Awaitable[None]]


async def run_in_order(
    consumer: AIOKafkaConsumer,
    handle: BatchHandler,
    stop: asyncio.Event,
    *,
    max_records: int = 256,
    poll_ms: int = 100,
) -> None:
    """Fetch, hand on, commit, until ``stop`` is set. The consumer must be started and subscribed."""
    while not stop.is_set():
        fetched = await consumer.getmany(timeout_ms=poll_ms, max_records=max_records)
        if not fetched:
            continue
        records = [record for batch in fetched.values() for record in batch]
        await _until_handed_on(handle, records, stop)
        try:
            await consumer.commit(_past_last(fetched))
        except (KafkaError, IllegalStateError) as exc:  # CommitFailedError is a KafkaError
            # A rebalance took the partitions (or this member was dropped after a long outage): whoever owns
            # them now re-reads the batch from the last commit, and the idempotent sinks absorb it. Not an
            # exit: aiokafka re-joins the group on the next fetch.
            log.warning("commit of a handed-on batch of %d failed (%r): it will be read again", len(records), exc)


TRANSIENT = (RetryableError, KafkaError, OSError, TimeoutError)


async def _until_handed_on(handle: BatchHandler, records: list[ConsumerRecord], stop: asyncio.Event) -> None:
    """Retry a batch through transient failures (store or broker outages), with exponential backoff and
    jitter, for as long as they last; nothing is committed meanwhile. Anything else propagates."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT),
        wait=wait_exponential_jitter(initial=0.2, max=5.0),
        before_sleep=lambda state: log.warning(
            "batch of %d waits out a transient failure (attempt %d): %r", len(records), state.attempt_number,
            state.outcome.exception() if state.outcome else None),
        reraise=True,
    ):
        with attempt:
            if stop.is_set() and attempt.retry_state.attempt_number > 1:
                raise asyncio.CancelledError  # shutting down: leave the batch uncommitted
            await handle(records)


def _past_last(fetched: dict[TopicPartition, list[ConsumerRecord]]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {tp: OffsetAndMetadata(batch[-1].offset + 1, "") for tp, batch in fetched.items() if batch}
