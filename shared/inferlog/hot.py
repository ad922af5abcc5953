"""Redis side channels: state, not log (DESIGN.md). Every key inferlog writes in Redis is named here.

    <prefix>:status:<id>    hot copy of a job's view (JSON), written by the result-store after Postgres
    <prefix>:done:<id>      pub/sub channel: the job reached a terminal status
    <prefix>:cancel:<id>    cancel flag (set by the gateway), and channel <prefix>:cancels for running work
    <prefix>:stream:<id>    Redis stream of token deltas, written by the worker, read by SSE clients
    <prefix>:lease:<id>     generation lease: ``<worker>/<nonce>`` of the attempt generating it, with a short
                            TTL it keeps renewing; ``done:<worker>/<nonce>`` once its result is on the log,
                            until the result-store has recorded it
    <prefix>:worker:<wid>   worker load hash (inferlog_worker.load)

Redis is AP here: every write is bounded by a TTL, every reader has a fallback (Postgres for status, the
terminal-result check for leases, polling for streams), and callers translate RedisError into their
fallback. Nothing here is the source of truth.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from redis.asyncio import Redis

from inferlog.leasing import LeaseState, Renewal

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

    def worker(self, worker_id: str) -> str:
        """A worker's load hash (``inferlog_worker.load``)."""
        return f"{self.prefix}:worker:{worker_id}"


class WorkerLoads:
    """The live workers' load hashes (``inferlog_worker.load``, refreshed with a TTL: a dead worker's goes
    away on its own), read: which models are served, in which versions. Raises on a Redis error: an
    unreadable Redis is "unknown", never "no worker"."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def serving(self) -> dict[str, dict[str, int]]:
        """model → {version → live workers serving it}."""
        found = [key async for key in self._redis.scan_iter(match=self._keys.worker("*"), count=1000)]
        if not found:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in found:
                pipe.hmget(key, ["model", "model_version"])
            rows = await pipe.execute()
        served: dict[str, dict[str, int]] = {}
        for model, version in rows:
            if model:  # (a hash that expired between the scan and the read is empty)
                versions = served.setdefault(_decode(model), {})
                versions[_decode(version or "")] = versions.get(_decode(version or ""), 0) + 1
        return served


class StatusCache:
    """Hot job views and terminal notifications."""

    _PUT_FORWARD = """
local current = redis.call('get', KEYS[1])
if current then
  local ok, old = pcall(cjson.decode, current)
  if ok and type(old) == 'table' and tonumber(old['rank']) and tonumber(old['rank']) > tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def put_many(self, views: list[dict[str, Any]]) -> None:
        """Write views (each with ``request_id``, ``status`` and ``rank``); announce the terminal ones. Forward
        only: a view whose status ranks below the stored one changes nothing (two store instances, one
        applying a late ``running`` event after the other stored ``completed``, never move a poll back)."""
        if not views:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for view in views:
                terminal = view.get("terminal", False)
                view = {**view, "hot_at": time.time()}  # when the store wrote it: a reader can tell it is stale
                pipe.eval(self._PUT_FORWARD, 1, self._keys.status(view["request_id"]), json.dumps(view),  # type: ignore[arg-type]
                          int(view.get("rank", 0)), STATUS_TTL_S if terminal else LIVE_STATUS_TTL_S)
                if terminal:
                    pipe.publish(self._keys.done(view["request_id"]), view["status"])
            await pipe.execute()

    async def get(self, request_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(self._keys.status(request_id))
        return json.loads(raw) if raw else None

    async def wait_done(self, request_id: str, timeout: float, is_done,  # type: ignore[no-untyped-def]
                        recheck_s: float = 2.0) -> bool:
        """Wait up to ``timeout`` for the job's terminal notification. ``is_done`` (async, re-reads the
        store) is checked after subscribing, so a notification sent just before is not missed, and again
        every ``recheck_s``: a notification the store failed to send (Redis blipped) costs at most that."""
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self._keys.done(request_id))
            if await is_done():
                return True
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            next_check = loop.time() + recheck_s
            while (left := deadline - loop.time()) > 0:
                message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=max(0.0, min(left, next_check - loop.time(), 1.0)))
                if message is not None:
                    return True
                if loop.time() >= next_check:
                    if await is_done():
                        return True
                    next_check = loop.time() + recheck_s
            return bool(await is_done())
        finally:
            await pubsub.aclose()  # (closing unsubscribes: one await, so a cancelled reader still releases it)


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

    def __init__(self, redis: Redis, keys: Keys, ttl_s: int = STREAM_TTL_S) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl_s = ttl_s

    async def append_many(self, deltas: list[tuple[str, dict[str, str]]]) -> None:
        if not deltas:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id, fields in deltas:
                key = self._keys.stream(request_id)
                pipe.xadd(key, fields)  # type: ignore[arg-type]
                pipe.expire(key, self._ttl_s)
            await pipe.execute()

    async def tail(self, request_id: str) -> str | None:
        """The ID of the stream's last entry now (None: no stream)."""
        reply: Any = await self._redis.xrevrange(self._keys.stream(request_id), count=1)
        return _decode(reply[0][0]) if reply else None

    async def read(self, request_id: str, after: str, block_ms: int | None) -> list[tuple[str, dict[str, str]]]:
        """Entries after ``after`` ("0" for all), waiting up to ``block_ms`` for new ones (None: not at all)."""
        reply: Any = await self._redis.xread({self._keys.stream(request_id): after}, block=block_ms, count=256)
        if not reply:
            return []
        [(_key, entries)] = reply
        return [(_decode(entry_id), {_decode(k): _decode(v) for k, v in fields.items()})
                for entry_id, fields in entries]


class Leases:
    """Generation leases: one worker generates a request while its lease lives (contract 4).

    The value names the holder and the attempt (``<worker_id>/<nonce>``), so no worker mistakes an earlier
    attempt of its own for the right to generate again: taking a lease is ``SET NX`` and nothing else.
    Once the result is acknowledged on the log the holder turns its lease into ``done:<value>`` with a long
    TTL; the result-store deletes it after recording the result. A watcher keeps watching a done lease, so
    no worker takes over finished work however far the store lags.

    Every method raises on a Redis error: an error is not an absence, and callers decide what it means.
    """

    _RENEW = """
local v = redis.call('get', KEYS[1])
if v == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) return 1 end
if not v then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end
return 0
"""
    _MARK_DONE = """
local v = redis.call('get', KEYS[1])
if v == ARGV[1] or not v then redis.call('set', KEYS[1], 'done:' .. ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
    _FORGET_DONE = "local v = redis.call('get', KEYS[1]) " \
                   "if v and string.sub(v, 1, 5) == 'done:' then return redis.call('del', KEYS[1]) end return 0"

    RENEWED, RETAKEN, LOST = Renewal.RENEWED, Renewal.RETAKEN, Renewal.LOST

    def __init__(self, redis: Redis, keys: Keys, holder: str, ttl_ms: int, done_ttl_ms: int = 3_600_000) -> None:
        self._redis = redis
        self._keys = keys
        self.holder = holder
        self.ttl_ms = ttl_ms
        self.done_ttl_ms = done_ttl_ms

    def new_value(self) -> str:
        """The value of one attempt's lease: this worker and a fresh nonce."""
        return f"{self.holder}/{uuid.uuid4().hex[:12]}"

    async def acquire(self, request_id: str, value: str) -> bool:
        """Take the lease for this attempt if nobody (this worker included) holds it."""
        return bool(await self._redis.set(self._keys.lease(request_id), value, nx=True, px=self.ttl_ms))

    async def acquire_many(self, wanted: dict[str, str]) -> set[str]:
        """Take each lease (request_id → this attempt's value) that nobody holds, in one round trip. Returns
        the request_ids not held by another attempt: taken, or (a command that failed alone) unknown, which
        the caller treats like an unreachable Redis (its renewal re-takes the lease or finds it lost). Raises
        if the round trip itself fails."""
        if not wanted:
            return set()
        items = list(wanted.items())
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id, value in items:
                pipe.set(self._keys.lease(request_id), value, nx=True, px=self.ttl_ms)
            replies = await pipe.execute(raise_on_error=False)
        return {request_id for (request_id, _value), reply in zip(items, replies, strict=True)
                if reply is True or isinstance(reply, Exception)}

    async def state_of(self, request_id: str) -> tuple[LeaseState, str | None]:
        """The lease's state and its holder's value (``None`` when free)."""
        raw = await self._redis.get(self._keys.lease(request_id))
        if raw is None:
            return LeaseState.FREE, None
        value = _decode(raw)
        if value.startswith("done:"):
            return LeaseState.DONE, value[len("done:"):]
        return LeaseState.LIVE, value

    async def renew_many(self, held: dict[str, str]) -> dict[str, int]:
        """Renew each held lease (request_id → value). Per request: RENEWED; RETAKEN (it had lapsed, e.g.
        while Redis was unreachable, and nobody else took it: it is ours again); LOST (another holder)."""
        if not held:
            return {}
        items = list(held.items())
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id, value in items:
                pipe.eval(self._RENEW, 1, self._keys.lease(request_id), value, self.ttl_ms)
            replies = await pipe.execute()
        return {request_id: int(reply) for (request_id, _value), reply in zip(items, replies, strict=True)}

    async def mark_done(self, request_id: str, value: str) -> bool:
        """The attempt's result is on the log: keep the lease (as done) until the store records it. False
        if another holder has it."""
        key = self._keys.lease(request_id)
        return await self._redis.eval(self._MARK_DONE, 1, key, value, self.done_ttl_ms) == 1  # type: ignore[misc]

    async def release(self, request_id: str, value: str) -> None:
        """Give up a live lease (the attempt was abandoned, nothing published)."""
        await self._redis.eval(self._RELEASE, 1, self._keys.lease(request_id), value)  # type: ignore[misc]

    async def release_many(self, held: dict[str, str]) -> None:
        """Give up several live leases (request_id → value) in one round trip."""
        if not held:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id, value in held.items():
                pipe.eval(self._RELEASE, 1, self._keys.lease(request_id), value)
            await pipe.execute()

    async def forget_recorded(self, request_ids: list[str]) -> None:
        """The store recorded these requests' terminal results: their done leases have served their purpose.
        A live lease is left alone (its holder is still generating; it renews or lets it expire)."""
        if not request_ids:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.eval(self._FORGET_DONE, 1, self._keys.lease(request_id))
            await pipe.execute()


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
