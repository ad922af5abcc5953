"""TierConsumer: the worker's Kafka adapter.

The worker finishes records out of order, so it cannot commit "everything fetched" (FastStream's ack and
aiokafka's auto-commit both would). This adapter fetches, tracks every fetched offset as unfinished,
commits each partition only up to its lowest unfinished record, and pauses/resumes partitions for
admission. On a rebalance it commits what is finished for the partitions it loses and forgets them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from inferlog_worker.watermarks import PartitionWatermarks

log = logging.getLogger(__name__)


class TierConsumer(ConsumerRebalanceListener):
    def __init__(self, consumer: AIOKafkaConsumer, topics: list[str],
                 on_revoked: Callable[[set[TopicPartition]], None] | None = None) -> None:
        self._consumer = consumer
        self._topics = topics
        self.on_revoked = on_revoked
        """Called with the partitions lost in a rebalance, after their finished work is committed."""
        self.watermarks = PartitionWatermarks()
        self.rebalances = 0
        """How many times partitions were assigned (1 after the first join)."""

    async def start(self) -> None:
        self._consumer.subscribe(self._topics, listener=self)
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment())

    async def fetch(self, max_records: int, timeout_ms: int = 50) -> list[ConsumerRecord]:
        """Fetch up to ``max_records`` from unpaused partitions; each is unfinished until ``finish``."""
        fetched = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max(1, max_records))
        records = []
        for tp, batch in fetched.items():
            for record in batch:
                self.watermarks.track(tp, record.offset)
                records.append(record)
        return records

    def finish(self, tp: TopicPartition, offset: int) -> None:
        self.watermarks.finish(tp, offset)

    async def commit(self, only: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Commit each owned partition up to its lowest unfinished record. Returns what was committed."""
        owned = self.assignment()
        due = {tp: off for tp, off in self.watermarks.due().items()
               if tp in owned and (only is None or tp in only)}
        if not due:
            return {}
        try:
            await self._consumer.commit({tp: OffsetAndMetadata(off, "") for tp, off in due.items()})
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            log.warning("commit of %s failed (a rebalance is likely under way): %s", due, exc)
            return {}
        for tp, off in due.items():
            self.watermarks.committed(tp, off)
        return due

    def pause_all(self) -> None:
        assigned = self.assignment()
        if assigned - set(self._consumer.paused()):
            self._consumer.pause(*assigned)

    def resume_only(self, topics: set[str]) -> None:
        """Fetch from these topics' partitions only (a tier with no room stays paused: still polled, so
        heartbeats and rebalances go on, but nothing of it is fetched)."""
        assigned = self.assignment()
        paused = set(self._consumer.paused())
        stop = {tp for tp in assigned if tp.topic not in topics} - paused
        go = {tp for tp in assigned if tp.topic in topics} & paused
        if stop:
            self._consumer.pause(*stop)
        if go:
            self._consumer.resume(*go)

    # ConsumerRebalanceListener

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            await self.commit(only=set(revoked))
            self.watermarks.forget(set(revoked))
            if self.on_revoked is not None:
                self.on_revoked(set(revoked))
            log.info("partitions revoked: %s", sorted(f"{tp.topic}:{tp.partition}" for tp in revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.rebalances += 1
        log.info("partitions assigned: %s", sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))
