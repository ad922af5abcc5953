"""The worker's transport shell: aiokafka, redis and asyncpg adapted to the dispatch core's ports
(``inferlog_worker.ports``). Each library's errors are translated here, once: a Redis failure becomes
SideChannelUnavailable, a broker outage is retried until the produce is acknowledged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from inferlog.errors import SideChannelUnavailable
from inferlog.kafka import publish_all
from inferlog_worker.ports import Outgoing

log = logging.getLogger(__name__)
T = TypeVar("T")


class KafkaPublisher:
    """Publish until acknowledged; a broker outage is waited out (the offsets wait with it)."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def __call__(self, outgoing: list[Outgoing]) -> None:
        delay = 0.2
        while True:
            try:
                await publish_all(self._producer, outgoing)
                return
            except (KafkaError, OSError) as exc:
                log.warning("publish failed, retrying in %.1fs: %r", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


class RedisPort:
    """Wraps a Redis-backed side channel (``inferlog.hot``): every coroutine method raises
    SideChannelUnavailable where redis raised, so the core never sees a redis exception."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if not asyncio.iscoroutinefunction(attribute):
            return attribute

        async def translated(*args: Any, **kwargs: Any) -> Any:
            try:
                return await attribute(*args, **kwargs)
            except (RedisError, OSError) as exc:
                raise SideChannelUnavailable(f"redis: {exc}") from exc

        return translated


async def listen_for_cancels(redis: Redis, channel: str, on_cancel: Callable[[str], None]) -> None:
    """Cancel notifications for running work; on a Redis outage, reconnect with backoff (the flags checked
    before each generation still catch a cancel made meanwhile)."""
    delay = 0.5
    while True:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(channel)
            delay = 0.5
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    data = message["data"]
                    on_cancel(data.decode() if isinstance(data, bytes) else str(data))
        except (RedisError, OSError) as exc:
            log.warning("cancel channel lost (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        finally:
            await _quietly(pubsub.aclose())


async def _quietly(call: Awaitable[T]) -> T | None:
    try:
        return await call
    except (RedisError, OSError):
        return None
