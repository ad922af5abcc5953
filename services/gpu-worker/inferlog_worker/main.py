"""GPU worker wiring. Run with ``inferlog run gpu-worker``."""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from redis.asyncio import Redis

from inferlog.db import connect_pool
from inferlog.epoch import BrokerGuard
from inferlog.errors import ConfigError
from inferlog.hot import CancelFlags, DeltaStream, Keys, Leases
from inferlog.kafka import make_consumer, make_producer
from inferlog.ledger import RequestLedger
from inferlog.models import ModelRegistry
from inferlog.runtime import stop_on_signals
from inferlog.topics import Topics
from inferlog_worker.admission import Capacity, KvAdmission
from inferlog_worker.consumer import TierConsumer
from inferlog_worker.dispatch import GpuWorker, SideChannels
from inferlog_worker.load import LoadReporter
from inferlog_worker.runner import GenerationJob, ModelRunner
from inferlog_worker.settings import WorkerSettings
from inferlog_worker.shell import KafkaPublisher, RedisPort, listen_for_cancels

log = logging.getLogger(__name__)


def build_runner(settings: WorkerSettings) -> ModelRunner:
    model = ModelRegistry(settings.common).get(settings.model_name)
    return ModelRunner(model, device=settings.device, num_blocks=settings.num_blocks,
                       page_size=settings.page_size, max_batch_tokens=settings.max_batch_tokens,
                       threads=settings.threads, test_hooks=settings.test_hooks)


def check_kv_capacity(settings: WorkerSettings, context: int) -> None:
    """A worker whose KV cache cannot hold one full-context request refuses to start: KV size is then a
    configuration error, never a request's failure."""
    capacity = settings.num_blocks * settings.page_size
    if capacity < context:
        raise ConfigError(
            f"the KV cache holds {capacity} tokens (INFERLOG_WORKER_NUM_BLOCKS={settings.num_blocks} x "
            f"INFERLOG_WORKER_PAGE_SIZE={settings.page_size}) but model {settings.model_name!r} has a context of "
            f"{context} tokens; raise INFERLOG_WORKER_NUM_BLOCKS to at least {-(-context // settings.page_size)}")


async def warm_up(runner: ModelRunner, batch: int) -> None:
    """Short generations before joining the group, so the first real requests pay no warm-up: a whole
    batch of them (a batched prefill's first run costs seconds more than one request's, measured on CPU:
    16 prompts x 32 tokens ran at 17 tokens/s cold, 50 warm)."""
    done = await asyncio.gather(*(runner.submit(GenerationJob(
        request_id=f"warmup-{i}", input_ids=[1 + (i + k) % 64 for k in range(32)], max_tokens=4, ignore_eos=True))
        for i in range(batch)))
    failed = [d.error for d in done if d.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"warm-up generation failed: {failed[0]}")


def capacity_of(settings: WorkerSettings) -> Capacity:
    """What the worker admits: its KV cache in tokens and its slots, with interactive's share of both."""
    kv_tokens = settings.num_blocks * settings.page_size
    slots = int(settings.max_running * settings.interactive_share)
    if settings.interactive_share > 0 and settings.max_running > 1:
        slots = max(1, slots)  # (3 slots at 0.25 would keep none)
    return Capacity(kv_tokens, settings.max_running, interactive_slots=slots,
                    interactive_kv_tokens=int(kv_tokens * settings.interactive_share))


def build_worker(settings: WorkerSettings, runner: ModelRunner, redis: Redis | None,
                 ledger: RequestLedger | None = None) -> GpuWorker:
    common = settings.common
    topics = Topics.from_settings(common)
    keys = Keys(common.redis_prefix)
    side = SideChannels(ledger=ledger)
    if redis is not None:  # each Redis channel behind the shell's adapter: its errors become SideChannelUnavailable
        side = SideChannels(
            ledger=ledger, leases=RedisPort(Leases(redis, keys, settings.worker_id, settings.lease_ttl_ms)),
            cancels=RedisPort(CancelFlags(redis, keys)), deltas=RedisPort(DeltaStream(redis, keys, common.stream_ttl_s)))
    consumer = make_consumer(
        common.kafka_bootstrap, settings.group_id or topics.group("gpu-workers"), session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms, max_poll_records=settings.max_running)
    tier = TierConsumer(consumer, [topics.tokenized_interactive, topics.tokenized_batch])
    worker = GpuWorker(
        worker_id=settings.worker_id, runner=runner, consumer=tier,
        publisher=KafkaPublisher(make_producer(common.kafka_bootstrap)), topics=topics,
        admission=KvAdmission(capacity_of(settings)),
        load=LoadReporter(redis, common.redis_prefix, settings.load_ttl_s) if redis is not None else None,
        load_interval_s=settings.load_interval_s, shutdown_grace_s=settings.shutdown_grace_s, side=side,
        watch_interval_s=settings.watch_interval_s, engine_watchdog_s=settings.engine_watchdog_s,
        max_engine_failures=settings.max_engine_failures)
    tier.on_revoked = worker.drop_revoked
    return worker


async def serve(settings: WorkerSettings) -> str | None:
    common = settings.common
    guard = BrokerGuard(common.kafka_bootstrap, Topics.from_settings(common),
                        interval_s=common.broker_check_interval_s)
    epoch = await guard.wait_until_sound()
    runner = build_runner(settings)
    runner.on_failure = _arm_hard_exit
    check_kv_capacity(settings, runner.model.context_length())
    await asyncio.to_thread(runner.load)
    await warm_up(runner, settings.max_running)
    redis = Redis.from_url(common.redis_url, socket_timeout=2, socket_connect_timeout=2)
    pool = await connect_pool(common.postgres_url, common.postgres_schema, max_size=4)
    worker = build_worker(settings, runner, redis, RequestLedger(pool))
    stop = stop_on_signals()
    await worker.start()
    log.info("worker %s ready", settings.worker_id)
    cancels = asyncio.create_task(listen_for_cancels(redis, Keys(common.redis_prefix).cancels, worker.cancel))
    watch = guard.start_watching(epoch)
    try:
        await worker.run(stop)
    finally:
        watch.cancel()
        cancels.cancel()
        await worker.close()
        await redis.aclose()
        await pool.close()
        if runner.failure is None:  # a failed engine's thread may hang: never wait on it
            await asyncio.to_thread(runner.stop, hard=True)
    return runner.failure


ENGINE_FAILED_EXIT = 3
"""The worker's exit status when its engine failed: restart it (the supervisor does); its work was left
uncommitted and its leases released, so other workers take it over."""
HARD_EXIT_AFTER_S = 4.0
"""Once the engine failed, the process ends within this long whatever its clean-up is waiting on."""


def _arm_hard_exit(reason: str) -> None:
    def hard_exit() -> None:
        log.error("exiting with status %d: the engine failed (%s); clean-up cut short", ENGINE_FAILED_EXIT, reason)
        logging.shutdown()
        os._exit(ENGINE_FAILED_EXIT)

    timer = threading.Timer(HARD_EXIT_AFTER_S, hard_exit)
    timer.daemon = True
    timer.start()


def run(settings: WorkerSettings | None = None) -> None:
    failure = asyncio.run(serve(settings or WorkerSettings()))
    code = 0
    if failure is not None:
        code = ENGINE_FAILED_EXIT
        log.error("exiting with status %d: the engine failed (%s)", code, failure)
    logging.shutdown()
    os._exit(code)  # not sys.exit: an engine thread that never stopped would keep the process alive
