"""The tokenizer's batch handler: prepare a batch, publish what it produced, return once acknowledged."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaProducer, ConsumerRecord

from inferlog.kafka import Outgoing, publish_all
from inferlog.messages import EventRecord, Status
from inferlog.topics import Topics
from inferlog_tokenizer.prep import RawRecord, RequestPreparer

log = logging.getLogger(__name__)


class TokenizeHandler:
    def __init__(self, preparer: RequestPreparer, producer: AIOKafkaProducer, topics: Topics) -> None:
        self._preparer = preparer
        self._producer = producer
        self._topics = topics

    async def __call__(self, records: list[ConsumerRecord]) -> None:
        raws = [RawRecord(r.topic, r.partition, r.offset, r.key, r.value) for r in records]
        prepared = self._preparer.prepare(raws)
        outgoing: list[Outgoing] = []
        for t in prepared.tokenized:
            outgoing.append((self._topics.tokenized(t.priority), t.request_id, t))
            outgoing.append((self._topics.events, t.request_id, EventRecord(
                request_id=t.request_id, status=Status.TOKENIZED, stage="tokenizer", timings=t.timings)))
        outgoing += [(self._topics.results, r.request_id, r) for r in prepared.results]
        outgoing += [(self._topics.dlq, d.request_id, d) for d in prepared.dead]
        await publish_all(self._producer, outgoing)
        for d in prepared.dead:
            log.warning("dead-lettered %s@%s:%s: %s", d.topic, d.partition, d.offset, d.error)
        log.info("tokenized %d, rejected %d of %d", len(prepared.tokenized), len(prepared.results), len(records))
