"""Result-store wiring. Run with ``inferlog run result-store``."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from inferlog.consume import run_in_order
from inferlog.db import connect_pool
from inferlog.epoch import BrokerGuard
from inferlog.hot import Keys, Leases, StatusCache
from inferlog.kafka import make_consumer, make_producer
from inferlog.ledger import RequestLedger
from inferlog.runtime import stop_on_signals
from inferlog.topics import Topics
from inferlog_store.handlers import StoreHandler
from inferlog_store.settings import StoreSettings
from inferlog_store.sink import ResultSink


async def serve(settings: StoreSettings) -> None:
    common = settings.common
    topics = Topics.from_settings(common)
    guard = BrokerGuard(common.kafka_bootstrap, topics, interval_s=common.broker_check_interval_s)
    epoch = await guard.wait_until_sound()
    pool = await connect_pool(common.postgres_url, common.postgres_schema)
    producer = make_producer(common.kafka_bootstrap)
    consumer = make_consumer(common.kafka_bootstrap, settings.group_id or topics.group("result-store"))
    consumer.subscribe([topics.events, topics.results])
    await producer.start()
    await consumer.start()
    stop = stop_on_signals()
    redis = Redis.from_url(common.redis_url, socket_timeout=2, socket_connect_timeout=2)
    keys = Keys(common.redis_prefix)
    hot = StatusCache(redis, keys)
    leases = Leases(redis, keys, holder="result-store", ttl_ms=1)  # only ever forgets recorded leases
    handler = StoreHandler(ResultSink(pool), producer, topics, RequestLedger(pool), hot, leases)
    watch = guard.start_watching(epoch)
    try:
        await run_in_order(consumer, handler, stop, max_records=settings.max_batch)
    finally:
        watch.cancel()
        await consumer.stop()
        await producer.stop()
        await pool.close()
        await redis.aclose()


def run(settings: StoreSettings | None = None) -> None:
    asyncio.run(serve(settings or StoreSettings()))
