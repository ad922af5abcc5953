"""Poisons that pass the schema (or nearly), produced straight onto every topic between 200 normal
requests (issue 8): no consumer stops, every consumer group commits past them, each poison ends where the
design says (dead letter, ``failed`` result, or stored faithfully), and the 200 complete, each generated
once."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from inferlog.db import connect_pool
from inferlog.kafka import make_producer
from inferlog.ledger import RequestLedger
from inferlog.messages import DeadLetter, Status
from tests.conftest import TINY, eventually
from tests.faults.conftest import FAULT_BUDGET_S, MakeCluster, start_pipeline
from tests.faults.harness import (
    Client,
    check,
    describe,
    lagging,
    long_bodies,
    read_topic,
    truthy,
    wait_all_terminal,
)

pytestmark = pytest.mark.faults


def _direct(request_id: str, **fields: Any) -> bytes:
    record: dict[str, Any] = {"request_id": request_id, "model": TINY, "params": {"max_tokens": 4},
                              "messages": [{"role": "user", "content": "hello"}]}
    for key, value in fields.items():
        if key == "stop":
            record["params"]["stop"] = value
        else:
            record[key] = value
    return json.dumps(record).encode()


DIRECT = {  # job key (default tenant) → value, onto the requests topic
    "fp-nul-content": _direct("fp-nul-content", messages=[{"role": "user", "content": "a\u0000b"}]),
    "fp-nul-stop": _direct("fp-nul-stop", stop=["\u0000"]),
    "fp-nul-session": _direct("fp-nul-session", session_id="s\u0000"),
    "fp-empty-stop": _direct("fp-empty-stop", stop=[""]),
    "fp-2mb": _direct("fp-2mb", messages=None, prompt="x" * 2_000_000),
}
TENANTED = {  # poisons whose tenant makes the job key a digest: dead letters, found by their record key
    "fp-nul-tenant": _direct("fp-nul-tenant", tenant="t\u0000"),
    "fp-big-tenant": _direct("fp-big-tenant", tenant="t" * 3000),
}


async def test_poisons_on_every_topic_stop_no_consumer(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster("fp")
    start_pipeline(cluster)
    await cluster.wait_ready()
    started = time.monotonic()
    topics = cluster.topics
    client = Client(cluster.url)
    submitting = asyncio.create_task(client.submit_many(long_bodies(200, "fp", low=16, high=48)))
    await eventually(lambda: truthy(len(client.accepted) >= 40), timeout=60, interval=0.05)

    producer = make_producer(cluster.settings.kafka_bootstrap, max_request_size=8_000_000)
    await producer.start()
    try:
        for key, value in {**DIRECT, **TENANTED}.items():
            await producer.send_and_wait(topics.requests, value, key=key.encode())
        # Token IDs beyond the vocabulary, as a tokenized record (a producer that skipped the tokenizer).
        await producer.send_and_wait(topics.tokenized_interactive, json.dumps({
            "request_id": "fp-vocab", "model": TINY, "input_ids": [1, 10**7], "params": {"max_tokens": 4}}).encode(),
            key=b"fp-vocab")
        # A "result" that is not terminal, for an ID a real request takes afterwards.
        await producer.send_and_wait(topics.results, b'{"request_id": "fp-later", "status": "running"}', key=b"fp-later")
        # Generated text with NUL in it (SmolLM2's token 190): stored faithfully.
        await producer.send_and_wait(topics.results, json.dumps({
            "request_id": "fp-nultext", "status": "completed", "finish_reason": "length",
            "text": "a\u0000b"}).encode(), key=b"fp-nultext")
        # Schema-valid, and Postgres cannot take it (int4 token counts): its request still ends.
        await producer.send_and_wait(topics.results, json.dumps({
            "request_id": "fp-int4", "status": "completed", "usage": {"completion_tokens": 10**12}}).encode(),
            key=b"fp-int4")
        await producer.send_and_wait(topics.events, json.dumps({
            "request_id": "fp\u0000ev", "status": "running", "stage": "gpu-worker"}).encode(), key=b"fp-ev")
    finally:
        await producer.stop()

    await submitting
    later = Client(cluster.url)
    await later.submit_many({"fp-later": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}})
    accepted = list(client.accepted) + list(later.accepted)
    assert len(accepted) == 201
    await wait_all_terminal(cluster.settings, accepted, timeout=FAULT_BUDGET_S)
    report = await check(cluster.settings, accepted)
    assert report.lost == [] and report.conflicting == [], describe(report)
    assert report.regenerated == [] and report.generations == report.accepted == 201, describe(report)
    assert report.statuses == {"completed": 201}, describe(report)
    for proc in cluster.procs.values():
        assert proc.popen.poll() is None, f"{proc.name} exited on a poison"

    pool = await connect_pool(cluster.settings.postgres_url, cluster.settings.postgres_schema)
    try:
        views = {v.request_id: v for v in await RequestLedger(pool).get_many(
            [*DIRECT, "fp-vocab", "fp-nultext", "fp-int4", "fp-later"])}
    finally:
        await pool.close()
    for key in DIRECT:
        assert views[key].status is Status.FAILED, (key, views.get(key))
    assert views["fp-vocab"].status is Status.FAILED and views["fp-vocab"].error["code"] == "invalid_token_ids"
    assert views["fp-nultext"].text == "a\u0000b", "generated text not stored faithfully"
    assert views["fp-int4"].error["code"] == "result_unstorable"
    assert views["fp-later"].status is Status.COMPLETED
    dead = [DeadLetter.model_validate_json(v) for _k, v in await read_topic(cluster.settings, topics.dlq)]
    dead_keys = {d.request_id or "" for d in dead}
    for key in [*DIRECT, *TENANTED, "fp-later", "fp-int4"]:
        assert any(k.endswith(key) for k in dead_keys), f"{key} has no dead letter"
    assert all(len(d.model_dump_json()) < 64_000 for d in dead), "a dead letter as big as its record"

    groups = {"tokenizer": [topics.requests], "result-store": [topics.events, topics.results],
              "gpu-workers": [topics.tokenized_interactive, topics.tokenized_batch]}
    for group, its_topics in groups.items():
        behind = await eventually(lambda g=group, t=its_topics: _none_behind(cluster, g, t), timeout=30, interval=1)
        assert behind == "none", (group, behind)
    assert time.monotonic() - started <= FAULT_BUDGET_S


async def _none_behind(cluster: Any, group: str, its_topics: list[str]) -> str | None:
    behind = await lagging(cluster.settings, cluster.topics.group(group), its_topics)
    return "none" if not behind else None
