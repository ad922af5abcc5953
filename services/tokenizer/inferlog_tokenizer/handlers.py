"""The tokenizer's batch handler: claim, prepare, publish what it produced, return once acknowledged.

Records that did not come through the gateway are claimed here before any work (contract 3): a record
whose ID is claimed with another payload is dead-lettered as a conflict and never generated (no result is
written under that ID: it belongs to the other job). A record whose job was cancelled before it got here
ends ``cancelled``.
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaProducer, ConsumerRecord

from inferlog.errors import IdempotencyConflict
from inferlog.kafka import Outgoing, publish_all
from inferlog.ledger import RequestLedger, key_of
from inferlog.messages import EventRecord, RequestRecord, Status, dead_letter, ended
from inferlog.topics import Topics
from inferlog_tokenizer.prep import Prepared, RawRecord, RequestPreparer

log = logging.getLogger(__name__)


class TokenizeHandler:
    def __init__(self, preparer: RequestPreparer, producer: AIOKafkaProducer, topics: Topics,
                 ledger: RequestLedger | None = None) -> None:
        self._preparer = preparer
        self._producer = producer
        self._topics = topics
        self._ledger = ledger

    async def __call__(self, records: list[ConsumerRecord]) -> None:
        raws = [RawRecord(r.topic, r.partition, r.offset, r.key, r.value) for r in records]
        parsed, prepared = self._preparer.parse(raws)
        if self._ledger is not None:
            await self._drop_failures_for_foreign_ids(prepared)
            parsed = await self._claim(parsed, prepared)
        prepared = self._preparer.prepare_parsed(parsed, prepared)
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
        log.info("tokenized %d, ended %d, dead-lettered %d of %d", len(prepared.tokenized),
                 len(prepared.results), len(prepared.dead), len(records))

    async def _claim(self, parsed: list[tuple[RawRecord, RequestRecord]],
                     prepared: Prepared) -> list[tuple[RawRecord, RequestRecord]]:
        assert self._ledger is not None
        if not parsed:
            return []
        # on_log: these records are on the requests topic already; no outbox relay may produce them again.
        outcomes = await self._ledger.claim_many([record for _raw, record in parsed], on_log=True)
        ours: list[tuple[RawRecord, RequestRecord]] = []
        seen: set[str] = set()
        for (raw, record), outcome in zip(parsed, outcomes, strict=True):
            key = key_of(record)
            if isinstance(outcome, IdempotencyConflict):
                prepared.dead.append(dead_letter(
                    "tokenizer", f"conflict: {outcome.message}", topic=raw.topic, partition=raw.partition,
                    offset=raw.offset, request_id=key, value=raw.value))
            elif key in seen:
                continue  # the same job twice in one batch: once is enough
            elif outcome.cancel_requested:
                seen.add(key)
                prepared.results.append(ended(
                    key, Status.CANCELLED, model=record.model, tenant=record.tenant, finish_reason="cancelled",
                    text="", timings=record.timings))
            else:
                seen.add(key)
                ours.append((raw, record))
        return ours

    async def _drop_failures_for_foreign_ids(self, prepared: Prepared) -> None:
        """Unreadable records (the only results so far) get their failed result only if the ID is not
        already another job's."""
        assert self._ledger is not None
        if not prepared.results:
            return
        taken = {v.request_id for v in await self._ledger.get_many([r.request_id for r in prepared.results])}
        prepared.results = [r for r in prepared.results if r.request_id not in taken]
