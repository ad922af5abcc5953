"""The worker's load hash in Redis (DESIGN.md, side channels): what routing and operators read.

``<prefix>:worker:<worker_id>`` is a hash refreshed every ``load_interval_s`` with a TTL, so a worker that
dies disappears on its own. Redis is AP here: a failed write is logged and retried next tick.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from inferlog.hot import Keys

log = logging.getLogger(__name__)


def load_key(prefix: str, worker_id: str) -> str:
    return Keys(prefix).worker(worker_id)


@dataclass(frozen=True)
class LoadSnapshot:
    worker_id: str
    model: str
    model_version: str
    running: int
    """Requests the engine is prefilling or decoding now (its running batch)."""
    admitted: int
    """Requests handed to the engine and not yet finished (running plus queued inside it)."""
    waiting: int
    """Fetched records waiting for KV capacity."""
    tokens_in_flight: int
    free_kv_blocks: int
    total_kv_blocks: int
    partitions: list[str]
    watching: int = 0
    """Requests another worker's lease holds, watched here (offsets kept uncommitted)."""
    in_preflight: int = 0
    """Admitted requests in preflight or recording their attempt (not yet in the engine)."""
    revoked_in_preflight: int = 0
    """Cumulative: admitted requests whose partition was revoked before they reached the engine."""
    takeovers: int = 0
    """Cumulative: requests taken over after another worker's lease expired."""

    def fields(self) -> dict[str, str]:
        return {
            "worker_id": self.worker_id, "model": self.model, "model_version": self.model_version,
            "running": str(self.running), "admitted": str(self.admitted), "waiting": str(self.waiting),
            "tokens_in_flight": str(self.tokens_in_flight), "free_kv_blocks": str(self.free_kv_blocks),
            "total_kv_blocks": str(self.total_kv_blocks), "partitions": json.dumps(self.partitions),
            "watching": str(self.watching), "in_preflight": str(self.in_preflight),
            "revoked_in_preflight": str(self.revoked_in_preflight), "takeovers": str(self.takeovers),
            "updated_at": f"{time.time():.3f}",
        }


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
