"""The result-store survives every record (issue 8): on the real Postgres, broker and Redis, one batch mixes
normal results with records the store can never hold or must not believe (schema-invalid ones, and one the
schema allows but Postgres rejects). The normal ones are stored, a generated text with NUL is stored
faithfully, and every poison ends in the dead-letter topic, bounded; the handler never raises (it would
stop the store's consumer on that batch forever)."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from redis.asyncio import Redis

from inferlog.config import InferlogSettings
from inferlog.db import connect_pool
from inferlog.hot import Keys, Leases, StatusCache
from inferlog.kafka import make_producer
from inferlog.ledger import RequestLedger
from inferlog.messages import DeadLetter, EventRecord, Status
from inferlog.topics import Topics
from inferlog_store.handlers import StoreHandler
from inferlog_store.sink import ResultSink
from tests.conftest import REDIS_URL
from tests.faults.harness import read_topic

pytestmark = pytest.mark.integration


@pytest.fixture
async def handler(settings: InferlogSettings) -> AsyncIterator[tuple[StoreHandler, RequestLedger]]:
    pool = await connect_pool(settings.postgres_url, settings.postgres_schema)
    producer = make_producer(settings.kafka_bootstrap)
    await producer.start()
    redis = Redis.from_url(REDIS_URL)
    keys = Keys(settings.redis_prefix)
    ledger = RequestLedger(pool)
    yield (StoreHandler(ResultSink(pool), producer, Topics.from_settings(settings), ledger=ledger,
                        hot=StatusCache(redis, keys), leases=Leases(redis, keys, "result-store", 1)), ledger)
    await producer.stop()
    await redis.aclose()
    await pool.close()


def _record(topic: str, offset: int, key: str, value: dict[str, Any] | bytes) -> Any:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return SimpleNamespace(topic=topic, partition=0, offset=offset, key=key.encode(), value=raw)


async def test_a_batch_of_poisons_stores_the_rest_and_dead_letters_each(
        handler: tuple[StoreHandler, RequestLedger], settings: InferlogSettings) -> None:
    store, ledger = handler
    topics = Topics.from_settings(settings)
    run = uuid.uuid4().hex[:8]
    ok, nul_text, nul_error = f"ok-{run}", f"nultext-{run}", f"nulerr-{run}"
    running, nul_tenant, big_tenant, nul_event = f"run-{run}", f"nt-{run}", f"bt-{run}", f"ne\x00{run}"
    generated = "token 190 is \x00; and a \U0001f600 after it\x00"
    done = {"status": "completed", "finish_reason": "length", "model": "m"}
    batch = [
        _record(topics.results, 0, ok, {"request_id": ok, "text": "hello", **done}),
        _record(topics.results, 1, nul_text, {"request_id": nul_text, "text": generated, **done}),
        _record(topics.results, 2, nul_error, {"request_id": nul_error, "status": "failed", "finish_reason": "error",
                                               "error": {"message": "engine said \x00", "code": "generation_failed"}}),
        _record(topics.results, 3, running, {"request_id": running, "status": "running"}),
        _record(topics.results, 4, nul_tenant, {"request_id": nul_tenant, "tenant": "a\x00b", **done}),
        _record(topics.results, 5, big_tenant, {"request_id": big_tenant, "tenant": secrets.token_hex(4000), **done}),
        _record(topics.events, 6, nul_event, {"request_id": nul_event, "status": "running", "stage": "gpu-worker"}),
        _record(topics.results, 7, f"huge-{run}", b'{"request_id": "huge", "text": "' + b"x" * 2_000_000),
        # Schema-valid, and Postgres still cannot take it (the token counts are int4 columns).
        _record(topics.results, 8, f"big-{run}", {"request_id": f"big-{run}", "usage": {"completion_tokens": 10**12},
                                                  **done}),
        _record(topics.events, 9, ok, EventRecord(request_id=ok, status=Status.RUNNING,
                                                  stage="gpu-worker").model_dump(mode="json")),
    ]
    await store(batch)  # never raises: a raise would stop the consumer on this batch for good

    views = {v.request_id: v for v in await ledger.get_many([ok, nul_text, nul_error, running, nul_tenant])}
    assert views[ok].status is Status.COMPLETED and views[ok].text == "hello", "a late event moved it back"
    assert views[nul_text].text == generated, "generated text not stored faithfully"
    assert views[nul_error].status is Status.FAILED and views[nul_error].error["message"] == "engine said \\u0000"
    assert running not in views and nul_tenant not in views, "a poison was stored"
    [stand_in] = await ledger.get_many([f"big-{run}"])  # schema-valid, unstorable: its request still ends
    assert stand_in.status is Status.FAILED and stand_in.error["code"] == "result_unstorable"
    tokenizer_says = f"nulmsg-{run}"  # the literal six characters, as the validation errors quote them
    await store([_record(topics.results, 10, tokenizer_says, {
        "request_id": tokenizer_says, "status": "failed", "error": {"message": "bad \\u0000 \u0000 here"}})])
    [quoted] = await ledger.get_many([tokenizer_says])
    assert quoted.error["message"] == "bad \\u0000 \\u0000 here", quoted.error

    dead = [DeadLetter.model_validate_json(value) for _key, value in await read_topic(settings, topics.dlq)]
    mine = {d.offset: d for d in dead if d.topic in (topics.results, topics.events) and run in (d.request_id or "")}
    assert set(mine) == {3, 4, 5, 6, 7, 8}, sorted(mine)
    assert "terminal" in mine[3].error and "NUL" in mine[4].error and "256" in mine[5].error
    assert "NUL" in mine[6].error and "cannot hold" in mine[8].error
    huge = mine[7]
    assert huge.truncated and len(huge.value) == 16_384 and huge.value_bytes == len(batch[7].value)
    assert huge.value_sha256 and len(huge.value_sha256) == 64


async def test_hot_status_only_moves_forward(settings: InferlogSettings) -> None:
    """Two store instances (events and results partitions apart): one writes ``completed``, the other a late
    ``running`` view of the same job afterwards; polls read Redis first, so the late one must change nothing."""
    from inferlog.ledger import JobView

    redis = Redis.from_url(REDIS_URL)
    try:
        cache = StatusCache(redis, Keys(f"hot{uuid.uuid4().hex[:6]}"))

        def view(status: Status, text: str | None) -> dict[str, Any]:
            return JobView(request_id="j", status=status, model="m", model_version=None, text=text,
                           finish_reason=None, prompt_tokens=None, completion_tokens=None, error=None,
                           timings={}, tenant=None).to_hot()

        await cache.put_many([view(Status.QUEUED, None)])
        await cache.put_many([view(Status.COMPLETED, "done \x00 text")])
        await cache.put_many([view(Status.RUNNING, None)])  # late, from the other instance
        hot = await cache.get("j")
        assert hot is not None and hot["status"] == "completed" and hot["text"] == "done \x00 text"
        assert JobView.from_hot(hot).status is Status.COMPLETED
    finally:
        await redis.aclose()


async def test_a_long_poll_sees_a_terminal_job_whose_notification_never_came() -> None:
    """The store recorded the result but its Redis notification failed: the long-poll re-checks the store
    every couple of seconds instead of waiting its whole time."""
    import asyncio

    redis = Redis.from_url(REDIS_URL)
    try:
        cache = StatusCache(redis, Keys(f"lp{uuid.uuid4().hex[:6]}"))
        loop = asyncio.get_running_loop()
        recorded_at = loop.time() + 0.5

        async def terminal_in_store() -> bool:
            return loop.time() >= recorded_at  # recorded half a second in; nothing is ever published

        started = loop.time()
        assert await cache.wait_done("j", 30.0, terminal_in_store, recheck_s=1.0)
        assert loop.time() - started < 5.0, "the long-poll waited for a notification that never came"
    finally:
        await redis.aclose()
