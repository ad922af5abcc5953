"""Tokenizer wiring. Run with ``inferlog run tokenizer``."""

from __future__ import annotations

import asyncio

from inferlog.consume import run_in_order
from inferlog.db import connect_pool
from inferlog.epoch import BrokerGuard
from inferlog.kafka import make_consumer, make_producer
from inferlog.ledger import RequestLedger
from inferlog.models import ModelRegistry
from inferlog.runtime import stop_on_signals
from inferlog.topics import Topics
from inferlog_tokenizer.handlers import TokenizeHandler
from inferlog_tokenizer.prep import RequestPreparer
from inferlog_tokenizer.settings import TokenizerSettings


async def serve(settings: TokenizerSettings) -> None:
    common = settings.common
    topics = Topics.from_settings(common)
    guard = BrokerGuard(common.kafka_bootstrap, topics, interval_s=common.broker_check_interval_s)
    epoch = await guard.wait_until_sound()
    producer = make_producer(common.kafka_bootstrap)
    consumer = make_consumer(common.kafka_bootstrap, settings.group_id or topics.group("tokenizer"))
    consumer.subscribe([topics.requests])
    await producer.start()
    await consumer.start()
    pool = await connect_pool(common.postgres_url, common.postgres_schema, max_size=4)
    stop = stop_on_signals()
    handler = TokenizeHandler(RequestPreparer(ModelRegistry(common), settings.max_max_tokens), producer, topics,
                              RequestLedger(pool))
    watch = guard.start_watching(epoch)
    try:
        await run_in_order(consumer, handler, stop, max_records=settings.max_batch)
    finally:
        watch.cancel()
        await consumer.stop()
        await producer.stop()
        await pool.close()


def run(settings: TokenizerSettings | None = None) -> None:
    asyncio.run(serve(settings or TokenizerSettings()))
