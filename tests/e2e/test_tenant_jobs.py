"""Two tenants with the same request ID through the whole pipeline (real processes, tiny model): two jobs,
each polled, streamed, listed and cancelled only by its owner, each generated once; a direct producer's
record with a tenant beside them; and the seed policy for a direct record."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from inferlog.identity import job_key
from inferlog.messages import DeadLetter, EventRecord, ResultRecord, Status
from tests.conftest import drop_schema, eventually, free_port, make_settings
from tests.faults.conftest import WORKER
from tests.faults.harness import Cluster, read_topic

pytestmark = pytest.mark.e2e

ALICE = {"Authorization": "Bearer key-a"}
BOB = {"Authorization": "Bearer key-b"}
LONG = {"messages": [{"role": "user", "content": "tell a long story"}], "max_tokens": 450, "ignore_eos": True,
        "request_id": "x"}


@pytest.fixture
async def cluster(run_id: str, tiny_dir: Path, tmp_path: Path) -> AsyncIterator[Cluster]:
    settings = make_settings(run_id, f"127.0.0.1:{free_port()}", tiny_dir, suffix="ten", with_smollm2=False)
    cluster = Cluster(settings, tmp_path)
    await cluster.start_infra()
    cluster.spawn("store", "result-store")
    cluster.spawn("w", "gpu-worker", **{**WORKER, "INFERLOG_WORKER_MAX_RUNNING": "4"})
    cluster.spawn("tok", "tokenizer")
    cluster.spawn("gw", "gateway", INFERLOG_GATEWAY_API_KEYS=json.dumps({"key-a": "alice", "key-b": "bob"}))
    try:
        await cluster.wait_ready()
        yield cluster
    finally:
        await cluster.close()
        await drop_schema(settings.postgres_schema)


async def _status(http: httpx.AsyncClient, headers: dict[str, str], wait: float = 0) -> dict:  # type: ignore[type-arg]
    response = await http.get("/v1/requests/x", params={"wait": wait}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def _sse_end(http: httpx.AsyncClient, headers: dict[str, str]) -> dict:  # type: ignore[type-arg]
    async with http.stream("GET", "/v1/requests/x/stream", headers=headers, timeout=120) as response:
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "done":
                return json.loads(line.split(":", 1)[1])  # type: ignore[no-any-return]
    raise AssertionError("the stream ended without a done event")


async def test_two_tenants_same_id_and_a_direct_producer(cluster: Cluster) -> None:
    topics = cluster.topics
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        a = await http.post("/v1/requests", json=LONG, headers=ALICE)
        b = await http.post("/v1/requests", json=LONG, headers=BOB)
        assert a.status_code == b.status_code == 202, (a.text, b.text)
        assert a.json()["id"] == b.json()["id"] == "x" and "Idempotent-Replayed" not in b.headers

        # A direct producer's record for tenant carol, same ID, and one that asks for a seed while sampling.
        producer = AIOKafkaProducer(bootstrap_servers=cluster.settings.kafka_bootstrap)
        await producer.start()
        try:
            for tenant, extra in (("carol", {}), ("dave", {"temperature": 0.8, "seed": 3})):
                record = {"request_id": "x", "tenant": tenant, "model": "tiny-llama", "prompt": "hello",
                          "params": {"max_tokens": 8, **extra}}
                await producer.send_and_wait(topics.requests, json.dumps(record).encode(),
                                             key=job_key(tenant, "x").encode())
        finally:
            await producer.stop()

        async def both_running() -> bool:
            return (await _status(http, ALICE))["status"] == "running" == (await _status(http, BOB))["status"]

        await eventually(both_running, timeout=60, interval=0.2)
        alice_stream = asyncio.create_task(_sse_end(http, ALICE))
        bob_stream = asyncio.create_task(_sse_end(http, BOB))
        cancel = await http.delete("/v1/requests/x", headers=ALICE)
        assert cancel.status_code == 202 and cancel.json()["id"] == "x"

        alice = await _status(http, ALICE, wait=60)
        assert alice["status"] == "cancelled", alice
        assert (await _status(http, BOB))["status"] == "running", "cancelling alice's x reached bob's x"
        bob = await _status(http, BOB, wait=60)
        assert bob["status"] == "completed" and bob["result"]["usage"]["completion_tokens"] == 450, bob
        assert (await alice_stream)["status"] == "cancelled"
        assert (await bob_stream)["status"] == "completed"

        for headers in (ALICE, BOB):
            listed = (await http.get("/v1/requests", headers=headers)).json()["data"]
            assert [job["id"] for job in listed] == ["x"], listed
        assert (await http.get("/v1/usage", headers=ALICE)).json()["completion_tokens"] < 450

    async def direct_records_ended() -> bool:
        conn_results = {ResultRecord.model_validate_json(v).request_id: ResultRecord.model_validate_json(v)
                        for _k, v in await read_topic(cluster.settings, topics.results)}
        return job_key("carol", "x") in conn_results and job_key("dave", "x") in conn_results

    await eventually(direct_records_ended, timeout=60, interval=0.5)
    results = [ResultRecord.model_validate_json(v) for _k, v in await read_topic(cluster.settings, topics.results)]
    by_key = {r.request_id: r for r in results}
    assert by_key["alice/x"].status is Status.CANCELLED and by_key["bob/x"].status is Status.COMPLETED
    assert by_key["carol/x"].status is Status.COMPLETED, by_key["carol/x"]
    dave = by_key["dave/x"]
    assert dave.status is Status.FAILED and dave.error is not None and dave.error.param == "seed", dave
    dead = [DeadLetter.model_validate_json(v) for _k, v in await read_topic(cluster.settings, topics.dlq)]
    assert [d.request_id for d in dead] == ["dave/x"], dead

    attempts = Counter(e.request_id for e in (EventRecord.model_validate_json(v) for _k, v in
                                              await read_topic(cluster.settings, topics.events))
                       if e.stage == "gpu-worker" and e.status is Status.RUNNING)
    assert attempts == {"alice/x": 1, "bob/x": 1, "carol/x": 1}, attempts
