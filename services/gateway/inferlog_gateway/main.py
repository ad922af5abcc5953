"""Gateway wiring: settings, pools, producer, routes, lifespan. Run with ``inferlog run gateway``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from redis.asyncio import Redis

from inferlog.admission import Admission, Limits
from inferlog.db import GuardedPool, connect_pool
from inferlog.hot import CancelFlags, DeltaStream, Keys, StatusCache, WorkerLoads
from inferlog.kafka import make_producer
from inferlog.ledger import RequestLedger
from inferlog.models import ModelRegistry
from inferlog.publishing import OutboxRelay, Submitter
from inferlog.topics import Topics, ensure_topics
from inferlog_gateway import errors, openai_routes, responses_routes
from inferlog_gateway.intake import Intake
from inferlog_gateway.jobs import JobReader
from inferlog_gateway.routes import GatewayState, router
from inferlog_gateway.settings import GatewaySettings
from inferlog_gateway.tenants import TenantKeys

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings) -> FastAPI:
    common = settings.common
    topics = Topics.from_settings(common)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ensure_topics(common.kafka_bootstrap, topics, create=False)
        registry = ModelRegistry(common)
        intake = Intake(registry, settings)
        intake.preload()
        pool = GuardedPool(await connect_pool(common.postgres_url, common.postgres_schema))
        producer = make_producer(common.kafka_bootstrap)
        await producer.start()

        async def broker_ready() -> bool:
            try:
                await asyncio.wait_for(producer.client.fetch_all_metadata(), 2.0)
                return True
            except Exception:  # any failure to reach the broker means not ready
                return False

        ledger = RequestLedger(pool)
        redis = Redis.from_url(common.redis_url, socket_timeout=2, socket_connect_timeout=2)
        keys = Keys(common.redis_prefix)
        jobs = JobReader(ledger, StatusCache(redis, keys), CancelFlags(redis, keys), DeltaStream(redis, keys))
        submitter = Submitter(ledger, producer, topics, settings.produce_timeout_s)
        relay = OutboxRelay(ledger, submitter, interval_s=settings.outbox_interval_s,
                            grace_s=settings.produce_timeout_s + 1, timeout_s=settings.produce_timeout_s)
        relay_task = asyncio.create_task(relay.run())
        app.state.gateway = GatewayState(
            intake=intake,
            submitter=submitter,
            ledger=ledger,
            max_body_bytes=settings.max_body_bytes,
            broker_ready=broker_ready,
            relay=relay,
            jobs=jobs,
            admission=Admission(ledger, Limits.from_settings(common)),
            keys=TenantKeys(settings.api_keys),
            registry=registry,
            loads=WorkerLoads(redis, keys),
            completion_wait_s=settings.completion_wait_s,
            cancel_on_disconnect=settings.cancel_on_disconnect,
        )
        try:
            yield
        finally:
            relay_task.cancel()
            await producer.stop()
            await redis.aclose()
            await pool.close()

    app = FastAPI(title="inferlog gateway", lifespan=lifespan)
    errors.install(app, settings.retry_after_s)
    app.include_router(router)
    app.include_router(openai_routes.router)
    app.include_router(responses_routes.router)
    return app


def run(settings: GatewaySettings | None = None) -> None:
    settings = settings or GatewaySettings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=5)
