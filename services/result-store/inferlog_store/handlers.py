"""The result-store's batch handler: decode events and results, apply them in one transaction."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaProducer, ConsumerRecord
from pydantic import ValidationError
from redis.exceptions import RedisError

from inferlog.hot import Leases, StatusCache
from inferlog.kafka import Outgoing, publish_all
from inferlog.ledger import RequestLedger
from inferlog.messages import DeadLetter, EventRecord, ResultRecord, Status, dead_letter, ended
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
        origin: dict[int, ConsumerRecord] = {}
        """Each decoded record's source (by the decoded record's id), to dead-letter it if Postgres rejects it."""
        for record in records:
            try:
                if record.topic == self._topics.results:
                    decoded: EventRecord | ResultRecord = ResultRecord.model_validate_json(record.value or b"")
                    results.append(decoded)  # type: ignore[arg-type]
                else:
                    decoded = EventRecord.model_validate_json(record.value or b"")
                    events.append(decoded)
                origin[id(decoded)] = record
            except ValidationError as exc:
                dead.append(self._dead(record, str(exc.errors()[0].get("msg"))))
        rejected = await self._sink.apply(events, results)
        # A record the store can never hold is set aside before anything is committed past it. A rejected
        # result still ends its request: a `failed` one stands in for it (on the log too, so a rebuilt store
        # agrees), unless even that cannot be stored (its ID itself is unstorable): the dead letter alone.
        dead += [self._dead(origin[id(r)], f"the store cannot hold this record: {exc}") for r, exc in rejected]
        substitutes = [_unstorable(r) for r, _exc in rejected if isinstance(r, ResultRecord)]
        unstorable = {id(r) for r, _exc in await self._sink.apply([], substitutes)} if substitutes else set()
        substitutes = [r for r in substitutes if id(r) not in unstorable]
        outgoing: list[Outgoing] = [(self._topics.dlq, d.request_id, d) for d in dead]
        outgoing += [(self._topics.results, r.request_id, r) for r in substitutes]
        if outgoing:
            await publish_all(self._producer, outgoing)
            for d in dead:
                log.warning("dead-lettered %s@%s:%s: %s", d.topic, d.partition, d.offset, d.error)
        unstored = {id(r) for r, _exc in rejected}
        events = [e for e in events if id(e) not in unstored]
        results = [r for r in results if id(r) not in unstored] + substitutes
        await self._refresh_hot({e.request_id for e in events} | {r.request_id for r in results})
        await self._forget_leases(sorted({r.request_id for r in results if r.status.is_terminal()}))

    @staticmethod
    def _dead(record: ConsumerRecord, reason: str) -> DeadLetter:
        return dead_letter("result-store", reason, topic=record.topic, partition=record.partition,
                           offset=record.offset, request_id=record.key.decode("utf-8", "replace") if record.key else None,
                           value=record.value)

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


def _unstorable(result: ResultRecord) -> ResultRecord:
    """What stands in for a result the store rejected: its request ends ``failed``, with none of the fields
    that may have been the trouble."""
    return ended(result.request_id, Status.FAILED, code="result_unstorable", error_type="server_error",
                 finish_reason="error", message="The request's result could not be stored (it is kept in the "
                 "dead-letter topic); retry the request with another request_id.")
