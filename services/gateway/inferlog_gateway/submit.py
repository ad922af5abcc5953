"""Accepting a job: claim its ID in the ledger, then put its record on the requests topic.

A 202 means the ID is claimed and the broker acknowledged the record. When the produce fails or times
out the claim is released and the client gets a 503 (the outbox that turns this into an accept is the
next step of the design).
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from inferlog.errors import BrokerUnavailable
from inferlog.kafka import encode, key_of
from inferlog.ledger import Claim, RequestLedger
from inferlog.messages import RequestRecord, Status, now
from inferlog.topics import Topics

log = logging.getLogger(__name__)


class Submitter:
    def __init__(self, ledger: RequestLedger, producer: AIOKafkaProducer, topics: Topics, timeout_s: float) -> None:
        self._ledger = ledger
        self._producer = producer
        self._topics = topics
        self._timeout_s = timeout_s

    async def submit(self, record: RequestRecord) -> Claim:
        claim = await self._ledger.claim(record)
        if not claim.created:
            return claim  # the same job again: nothing new to produce or generate
        queued_at = now()
        queued = record.model_copy(update={"timings": record.timings.merged(queued_at=queued_at)})
        try:
            await asyncio.wait_for(
                self._producer.send_and_wait(self._topics.requests, encode(queued), key=key_of(record.request_id)),
                self._timeout_s,
            )
        except (KafkaError, TimeoutError, OSError) as exc:
            await self._ledger.release(record.request_id)
            raise BrokerUnavailable(f"produce of {record.request_id} failed: {exc!r}") from exc
        await self._ledger.mark_published(record.request_id, queued_at)
        log.info("accepted %s", record.request_id)
        return Claim(record.request_id, created=True, status=Status.QUEUED)
