"""Redis side channels: state, not log (DESIGN.md). Every key inferlog writes in Redis is named here.

    <prefix>:status:<id>    hot copy of a job's view (JSON), written by the result-store after Postgres
    <prefix>:done:<id>      pub/sub channel: the job reached a terminal status
    <prefix>:cancel:<id>    cancel flag (set by the gateway), and channel <prefix>:cancels for running work
    <prefix>:stream:<id>    Redis stream of token deltas, written by the worker, read by SSE clients
    <prefix>:lease:<id>     generation lease: the worker generating it, with a short TTL it keeps renewing
    <prefix>:worker:<wid>   worker load hash (inferlog_worker.load)

Redis is AP here: every write is bounded by a TTL, every reader has a fallback (Postgres for status, the
terminal-result check for leases, polling for streams), and callers translate RedisError into their
fallback. Nothing here is the source of truth.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from redis.asyncio import Redis

STATUS_TTL_S = 3600
"""Terminal views stay hot for an hour; Postgres has them forever."""
LIVE_STATUS_TTL_S = 120
"""A non-terminal view expires soon, so a missed update (Redis briefly down) cannot go stale for long."""
STREAM_TTL_S = 3600


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def status(self, request_id: str) -> str:
        return f"{self.prefix}:status:{request_id}"

    def done(self, request_id: str) -> str:
        return f"{self.prefix}:done:{request_id}"

    def cancel(self, request_id: str) -> str:
        return f"{self.prefix}:cancel:{request_id}"

    @property
    def cancels(self) -> str:
        return f"{self.prefix}:cancels"

    def stream(self, request_id: str) -> str:
        return f"{self.prefix}:stream:{request_id}"

    def lease(self, request_id: str) -> str:
        return f"{self.prefix}:lease:{request_id}"


class StatusCache:
    """Hot job views and terminal notifications."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def put_many(self, views: list[dict[str, Any]]) -> None:
        """Write views (each with ``request_id`` and ``status``); announce the terminal ones."""
        if not views:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for view in views:
                terminal = view.get("terminal", False)
                pipe.set(self._keys.status(view["request_id"]), json.dumps(view),
                         ex=STATUS_TTL_S if terminal else LIVE_STATUS_TTL_S)
                if terminal:
                    pipe.publish(self._keys.done(view["request_id"]), view["status"])
            await pipe.execute()

    async def get(self, request_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(self._keys.status(request_id))
        return json.loads(raw) if raw else None

    async def wait_done(self, request_id: str, timeout: float, is_done) -> bool:  # type: ignore[no-untyped-def]
        """Wait up to ``timeout`` for the job's terminal notification. ``is_done`` (async, re-reads the
        store) is checked after subscribing, so a notification sent just before is not missed."""
        pubsub = self._redis.pubsub()
        await pubsub.subscribe(self._keys.done(request_id))
        try:
            if await is_done():
                return True
            deadline = asyncio.get_running_loop().time() + timeout
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(left, 1.0))
                if message is not None:
                    return True
            return bool(await is_done())
        finally:
            await pubsub.unsubscribe()
            await pubsub.aclose()


class CancelFlags:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def raise_flag(self, request_id: str, ttl_s: int = 86_400) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._keys.cancel(request_id), "1", ex=ttl_s)
            pipe.publish(self._keys.cancels, request_id)
            await pipe.execute()

    async def flagged(self, request_ids: list[str]) -> set[str]:
        if not request_ids:
            return set()
        values = await self._redis.mget([self._keys.cancel(r) for r in request_ids])
        return {r for r, v in zip(request_ids, values, strict=True) if v}


class DeltaStream:
    """Token deltas of one job as a Redis stream: ``{"d": text}`` entries, then ``{"end": status}``."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def append_many(self, deltas: list[tuple[str, dict[str, str]]]) -> None:
        if not deltas:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id, fields in deltas:
                key = self._keys.stream(request_id)
                pipe.xadd(key, fields)  # type: ignore[arg-type]
                pipe.expire(key, STREAM_TTL_S)
            await pipe.execute()

    async def read(self, request_id: str, after: str, block_ms: int) -> list[tuple[str, dict[str, str]]]:
        """Entries after ``after`` ("0" for all), waiting up to ``block_ms`` for new ones."""
        reply: Any = await self._redis.xread({self._keys.stream(request_id): after}, block=block_ms, count=256)
        if not reply:
            return []
        [(_key, entries)] = reply
        return [(_decode(entry_id), {_decode(k): _decode(v) for k, v in fields.items()})
                for entry_id, fields in entries]


class Leases:
    """Generation leases: one worker generates a request while its lease lives (contract 4)."""

    _RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) " \
             "else return 0 end"
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

    def __init__(self, redis: Redis, keys: Keys, holder: str, ttl_ms: int) -> None:
        self._redis = redis
        self._keys = keys
        self.holder = holder
        self.ttl_ms = ttl_ms

    async def acquire(self, request_id: str) -> bool:
        """Take the lease if nobody holds it (or we already do)."""
        key = self._keys.lease(request_id)
        if await self._redis.set(key, self.holder, nx=True, px=self.ttl_ms):
            return True
        return await self._redis.eval(self._RENEW, 1, key, self.holder, self.ttl_ms) == 1  # type: ignore[misc]

    async def holder_of(self, request_id: str) -> str | None:
        value = await self._redis.get(self._keys.lease(request_id))
        return _decode(value) if value is not None else None

    async def renew_many(self, request_ids: list[str]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.eval(self._RENEW, 1, self._keys.lease(request_id), self.holder, self.ttl_ms)
            await pipe.execute()

    async def release(self, request_id: str) -> None:
        await self._redis.eval(self._RELEASE, 1, self._keys.lease(request_id), self.holder)  # type: ignore[misc]


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
