"""The result-store's batch handler: decode events and results, apply them in one transaction."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaProducer, ConsumerRecord
from pydantic import ValidationError

from inferlog.kafka import publish_all
from inferlog.messages import DeadLetter, EventRecord, ResultRecord
from inferlog.topics import Topics
from inferlog_store.sink import ResultSink

log = logging.getLogger(__name__)


class StoreHandler:
    def __init__(self, sink: ResultSink, producer: AIOKafkaProducer, topics: Topics) -> None:
        self._sink = sink
        self._producer = producer
        self._topics = topics

    async def __call__(self, records: list[ConsumerRecord]) -> None:
        events: list[EventRecord] = []
        results: list[ResultRecord] = []
        dead: list[DeadLetter] = []
        for record in records:
            try:
                if record.topic == self._topics.results:
                    results.append(ResultRecord.model_validate_json(record.value or b""))
                else:
                    events.append(EventRecord.model_validate_json(record.value or b""))
            except ValidationError as exc:
                dead.append(DeadLetter(
                    stage="result-store", error=str(exc.errors()[0].get("msg")), topic=record.topic,
                    partition=record.partition, offset=record.offset,
                    request_id=record.key.decode("utf-8", "replace") if record.key else None,
                    value=(record.value or b"").decode("utf-8", "replace"),
                ))
        if dead:  # a record that can never be applied is set aside before anything is committed past it
            await publish_all(self._producer, [(self._topics.dlq, d.request_id, d) for d in dead])
            for d in dead:
                log.warning("dead-lettered %s@%s:%s: %s", d.topic, d.partition, d.offset, d.error)
        await self._sink.apply(events, results)
