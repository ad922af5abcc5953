"""The worker's commit logic against the real broker: out-of-order completion never moves a partition's
committed offset past the lowest unfinished record."""

import uuid

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from inferlog.kafka import make_consumer, make_producer
from inferlog_worker.consumer import TierConsumer

pytestmark = pytest.mark.integration


async def test_out_of_order_completion_commits_only_the_contiguous_prefix(bootstrap: str) -> None:
    topic = f"wm-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 1, 1)])
    await admin.close()
    producer = make_producer(bootstrap)
    await producer.start()
    batch = producer.create_batch()
    for i in range(10):
        batch.append(key=f"k{i}".encode(), value=f"v{i}".encode(), timestamp=None)
    await (await producer.send_batch(batch, topic, partition=0))
    await producer.stop()

    group = f"g-{uuid.uuid4().hex[:8]}"
    tier = TierConsumer(make_consumer(bootstrap, group), [topic])
    await tier.start()
    tp = TopicPartition(topic, 0)
    try:
        records = []
        while len(records) < 10:
            records += await tier.fetch(100, timeout_ms=500)
        assert [r.offset for r in records] == list(range(10))  # a 10-record batch gets offsets 0..9

        consumer = tier._consumer  # noqa: SLF001 - the test reads back what the broker committed
        for offset in (7, 3, 9, 1, 2):
            tier.finish(tp, offset)
            await tier.commit()
            assert (await consumer.committed(tp)) in (None, 0)
        tier.finish(tp, 0)
        await tier.commit()
        assert await consumer.committed(tp) == 4  # 0-3 finished, 4 is the lowest unfinished
        for offset in (4, 5, 6):
            tier.finish(tp, offset)
        await tier.commit()
        assert await consumer.committed(tp) == 8
        tier.finish(tp, 8)
        await tier.commit()
        assert await consumer.committed(tp) == 10
    finally:
        await tier.stop()
