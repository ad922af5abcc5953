"""Reading a topic as it stands: every partition from its start to the high-water mark its fetches report.

This broker's ``end_offsets`` and ``offsets_for_times`` are unreliable (DESIGN.md: ``end_offsets`` returned 1
after a 10-record batch; ``offsets_for_times`` answers 0 when nothing matches), so a time window is a full
scan filtered by record timestamp, and "read to the end" means: the position reached the high-water mark
a fetch response carried. A scan that cannot get there in time raises rather than returning a short read.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiokafka import TopicPartition

from inferlog.errors import ConfigError
from inferlog.kafka import make_consumer


@dataclass(frozen=True)
class LoggedRecord:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None


async def scan(bootstrap: str, topic: str, *, since_ms: int | None = None, until_ms: int | None = None,
               timeout_s: float = 60.0, max_records: int = 5_000) -> AsyncIterator[list[LoggedRecord]]:
    """The records of ``topic`` (within ``[since_ms, until_ms]`` by record timestamp, when given), in batches
    as fetched. Raises ConfigError if the topic is unknown to the broker, TimeoutError if the scan fetches
    nothing for ``timeout_s`` before every partition is read to its high-water mark."""
    consumer = make_consumer(bootstrap, None)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise ConfigError(f"topic {topic} is not on the broker at {bootstrap}: run `inferlog topics`")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while True:
            fetched = await consumer.getmany(timeout_ms=200, max_records=max_records)
            batch = [LoggedRecord(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value)
                     for records in fetched.values() for r in records
                     if (since_ms is None or r.timestamp >= since_ms) and (until_ms is None or r.timestamp <= until_ms)]
            if batch:
                yield batch
            behind = [tp for tp in tps if consumer.highwater(tp) is None
                      or await consumer.position(tp) < (consumer.highwater(tp) or 0)]
            if not behind:
                return
            if fetched:  # the limit is on a scan that stalls, not on a long one
                deadline = time.monotonic() + timeout_s
            elif time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: partitions {[tp.partition for tp in behind]} not read to their "
                                   f"high-water mark: nothing fetched for {timeout_s:.0f}s")
    finally:
        await consumer.stop()


async def read_all(bootstrap: str, topic: str, **options: object) -> list[LoggedRecord]:
    """Every record of ``topic`` (``scan``'s options), in one list."""
    out: list[LoggedRecord] = []
    async for batch in scan(bootstrap, topic, **options):  # type: ignore[arg-type]
        out += batch
    return out


async def read_at(bootstrap: str, topic: str, partition: int, offset: int, *,
                  timeout_s: float = 15.0) -> LoggedRecord | None:
    """The record at ``offset`` of ``topic``'s ``partition``, or None when the log no longer holds it
    (the partition is missing, starts after it or ends before it). Raises TimeoutError if the broker
    answers no fetch within ``timeout_s``."""
    consumer = make_consumer(bootstrap, None)
    await consumer.start()
    try:
        if partition not in (consumer.partitions_for_topic(topic) or set()) or offset < 0:
            return None
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while True:
            fetched = await consumer.getmany(tp, timeout_ms=200, max_records=1)
            for r in fetched.get(tp, []):
                return LoggedRecord(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value) \
                    if r.offset == offset else None  # past it: the offset is gone (compacted or truncated)
            high = consumer.highwater(tp)
            if high is not None and high <= offset:
                return None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}[{partition}]@{offset}: nothing fetched for {timeout_s:.0f}s")
    finally:
        await consumer.stop()
