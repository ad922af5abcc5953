"""The worker's load hash in Redis (DESIGN.md, side channels): what routing and operators read.

``<prefix>:worker:<worker_id>`` is a hash refreshed every ``load_interval_s`` with a TTL, so a worker that
dies disappears on its own. Redis is AP here: a failed write is logged and retried next tick.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from inferlog.hot import Keys
from inferlog_worker.ports import LoadSnapshot

log = logging.getLogger(__name__)


def load_key(prefix: str, worker_id: str) -> str:
    return Keys(prefix).worker(worker_id)


class LoadReporter:
    def __init__(self, redis: Redis, prefix: str, ttl_s: int) -> None:
        self._redis = redis
        self._prefix = prefix
        self._ttl_s = ttl_s

    async def publish(self, snapshot: LoadSnapshot) -> None:
        key = load_key(self._prefix, snapshot.worker_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=snapshot.fields())  # type: ignore[arg-type]  # stubs: invariant keys
                pipe.expire(key, self._ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("load hash not published: %s", exc)

    async def remove(self, worker_id: str) -> None:
        try:
            await self._redis.delete(load_key(self._prefix, worker_id))
        except (RedisError, OSError) as exc:
            log.warning("load hash not removed: %s", exc)
