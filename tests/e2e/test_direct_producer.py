"""Batch producers (issue 11): the requests topic is a published contract. A producer that is not this
project's code (librdkafka, through ``confluent-kafka``) writes ``schemas/examples/request.json`` with fresh
IDs straight onto the topic, once and once more (a retry); every job is served once and polled over HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer

from tests.conftest import TINY
from tests.faults.conftest import MakeCluster, start_pipeline
from tests.faults.harness import check, describe

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "schemas" / "examples" / "request.json"
JOBS = 6


def _produce(bootstrap: str, topic: str, records: list[dict[str, Any]]) -> list[str]:
    """Produce each record under its request_id (the default tenant's job key); returns delivery errors."""
    errors: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": False, "acks": "all",
                         "allow.auto.create.topics": False})
    for record in records:
        producer.produce(topic, key=record["request_id"], value=json.dumps(record), on_delivery=delivered)
    left = producer.flush(30)
    return errors + ([f"{left} records not delivered"] if left else [])


async def test_a_third_party_producer_writes_the_example_and_polls_the_results(
        make_cluster: MakeCluster, run_id: str) -> None:
    cluster = await make_cluster("direct")
    settings = cluster.settings
    start_pipeline(cluster)
    await cluster.wait_ready()
    example = json.loads(EXAMPLE.read_text())
    # Fresh IDs; the stack under test serves the tiny model in place of the example's default one.
    records = [{**example, "request_id": f"{example['request_id']}.{run_id}.{i}", "model": TINY}
               for i in range(JOBS)]
    ids = [r["request_id"] for r in records]
    errors = await asyncio.to_thread(_produce, settings.kafka_bootstrap, cluster.topics.requests,
                                     records + records[:2])  # two produced twice, as a retry would
    assert errors == []
    async with httpx.AsyncClient(base_url=cluster.url, timeout=40) as http:
        polled = {}
        for rid in ids:
            for _ in range(6):
                response = await http.get(f"/v1/requests/{rid}", params={"wait": 30})
                if response.status_code == 200 and response.json()["status"] == "completed":
                    break
                await asyncio.sleep(0.5)  # a 404 until the tokenizer has claimed it
            polled[rid] = response.json()
    assert {rid: p["status"] for rid, p in polled.items()} == {rid: "completed" for rid in ids}, polled
    assert all(p["result"]["usage"]["completion_tokens"] > 0 and p["model"] == TINY for p in polled.values())
    report = await check(settings, ids)
    assert report.lost == [] and report.conflicting == [], describe(report)
    assert report.generations_by_id == {rid: 1 for rid in ids}, describe(report)  # the retries ran nothing
