"""The result-store's batch handler: decode events and results, apply them in one transaction."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaProducer, ConsumerRecord
from pydantic import ValidationError
from redis.exceptions import RedisError

from inferlog.hot import Leases, StatusCache
from inferlog.kafka import publish_all
from inferlog.ledger import RequestLedger
from inferlog.messages import DeadLetter, EventRecord, ResultRecord, dead_letter
from inferlog.topics import Topics
from inferlog_store.sink import ResultSink

log = logging.getLogger(__name__)


class StoreHandler:
    def __init__(self, sink: ResultSink, producer: AIOKafkaProducer, topics: Topics,
                 ledger: RequestLedger | None = None, hot: StatusCache | None = None,
                 leases: Leases | None = None) -> None:
        self._sink = sink
        self._leases = leases
        self._producer = producer
        self._topics = topics
        self._ledger = ledger
        self._hot = hot

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
                dead.append(dead_letter(
                    "result-store", str(exc.errors()[0].get("msg")), topic=record.topic,
                    partition=record.partition, offset=record.offset,
                    request_id=record.key.decode("utf-8", "replace") if record.key else None, value=record.value))
        if dead:  # a record that can never be applied is set aside before anything is committed past it
            await publish_all(self._producer, [(self._topics.dlq, d.request_id, d) for d in dead])
            for d in dead:
                log.warning("dead-lettered %s@%s:%s: %s", d.topic, d.partition, d.offset, d.error)
        await self._sink.apply(events, results)
        await self._refresh_hot({e.request_id for e in events} | {r.request_id for r in results})
        await self._forget_leases(sorted({r.request_id for r in results if r.status.is_terminal()}))

    async def _forget_leases(self, request_ids: list[str]) -> None:
        """A worker keeps a finished request's lease (marked done) until its result is recorded, so no
        watcher takes it over meanwhile; recorded now, the lease can go. Best effort: it has a TTL."""
        if self._leases is None or not request_ids:
            return
        try:
            await self._leases.forget_recorded(request_ids)
        except (RedisError, OSError) as exc:
            log.warning("leases of %d recorded requests left to expire: %s", len(request_ids), exc)

    async def _refresh_hot(self, request_ids: set[str]) -> None:
        """Copy the stored views to Redis and announce terminal ones. Redis is best effort (AP): a failure
        is logged, and polls fall back to Postgres; live views expire within minutes anyway."""
        if self._hot is None or self._ledger is None or not request_ids:
            return
        views = await self._ledger.get_many(sorted(request_ids))
        try:
            await self._hot.put_many([v.to_hot() for v in views])
        except (RedisError, OSError) as exc:
            log.warning("hot status not refreshed for %d requests: %s", len(views), exc)
