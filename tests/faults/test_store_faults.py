"""Faults 5, 6 and 7: Redis stopped, Postgres stopped, the broker paused, each during traffic. Each test
stops only instances of its own (embedded Postgres / Redis on free ports, its own Tansu), never the
machine's services."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from inferlog.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.conftest import eventually
from tests.faults.conftest import FAULT_BUDGET_S, MakeCluster, start_pipeline
from tests.faults.harness import (
    Client,
    check,
    completed_since,
    describe,
    long_bodies,
    read_topic,
    running_at_least,
    stage_times,
    truthy,
    wait_all_terminal,
)

pytestmark = pytest.mark.faults



async def test_redis_stopped_during_traffic(make_cluster: MakeCluster, own_redis: EmbeddedRedis) -> None:
    cluster = await make_cluster("f5", redis_url=own_redis.url)
    start_pipeline(cluster)
    await cluster.wait_ready()
    started = time.monotonic()
    client = Client(cluster.url)
    bodies = long_bodies(200, "f5")
    submitting = asyncio.create_task(client.submit_many(bodies))
    await eventually(lambda: running_at_least(cluster, "w", 10), timeout=60, interval=0.05)

    stopped_at = time.time()  # before stop(): a lease acquire can fail while Redis shuts down
    own_redis.stop()
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        await eventually(lambda: truthy(len(client.accepted) >= 60), timeout=60, interval=0.05)
        some = sorted(client.accepted)[:20]
        for rid in some:  # polls answer from Postgres
            poll = await http.get(f"/v1/requests/{rid}")
            assert poll.status_code == 200 and poll.json()["id"] == rid
        key = next(iter(bodies))
        again = await http.post("/v1/requests", json=bodies[key], headers={"Idempotency-Key": key})
        assert again.status_code == 202 and again.headers.get("Idempotent-Replayed") == "true"
        conflict = await http.post("/v1/requests", json={**bodies[key], "max_tokens": 3},
                                   headers={"Idempotency-Key": key})
        assert conflict.status_code == 422  # the ledger decides, Redis or not
        # Down until the fault hits the leases: a batch admitted now cannot take them (a fixed pause could end
        # before the running batch frees a slot, and then no lease acquire would have met the outage).
        worker_log = cluster.procs["w"].log
        await eventually(lambda: truthy("leases not taken" in worker_log.read_text(errors="replace")),
                         timeout=45, interval=0.1)
    own_redis.start()  # back, empty
    restarted_at = time.time()

    await submitting
    await wait_all_terminal(cluster.settings, list(client.accepted), timeout=FAULT_BUDGET_S)
    report = await check(cluster.settings, list(client.accepted))
    assert report.accepted == 200
    assert report.lost == [] and report.conflicting == [], describe(report)
    assert report.regenerated == [] and report.generations == report.accepted, describe(report)
    # The fault hit the leases: generations started while Redis was down, their lease acquires failed, and
    # they ran on the terminal check alone.
    during = [rid for rid, times in report.attempt_times.items() if any(stopped_at < t < restarted_at for t in times)]
    assert during, "no generation started while Redis was down"
    assert time.monotonic() - started <= FAULT_BUDGET_S


async def test_postgres_stopped_during_traffic(make_cluster: MakeCluster, own_postgres: EmbeddedPostgres) -> None:
    cluster = await make_cluster("f6", postgres_url=own_postgres.url)
    start_pipeline(cluster)
    await cluster.wait_ready()
    started = time.monotonic()
    client = Client(cluster.url)
    bodies = list(long_bodies(200, "f6").items())
    submitting = asyncio.create_task(client.submit_many(dict(bodies[:190])))
    await eventually(lambda: running_at_least(cluster, "w", 10), timeout=60, interval=0.05)

    own_postgres.stop()
    stopped_at = time.time()
    # Submitted only now (the first 190 may all be in already): these are refused until Postgres is back.
    late = asyncio.create_task(client.submit_many(dict(bodies[190:]), deadline_s=120))
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        refused = await http.post("/v1/requests", json={"messages": [{"role": "user", "content": "x"}]})
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "store_unavailable"
        await asyncio.sleep(8.0)  # longer than any single retry: services wait it out, committing nothing
        assert (await http.get("/readyz")).status_code == 503
        # Down until a generation finished during the outage is on the log (the running batch ends within
        # seconds here, but a slow machine must not end the outage first).
        await eventually(lambda: completed_since(cluster.settings, stopped_at), timeout=45, interval=0.5)
    restarting_at = time.time()  # before start(): the store may write before start() sees Postgres ready
    own_postgres.start()

    await submitting
    await late
    assert client.retries > 0
    await wait_all_terminal(cluster.settings, list(client.accepted), timeout=FAULT_BUDGET_S)
    report = await check(cluster.settings, list(client.accepted))
    assert report.accepted == 200
    assert report.lost == [] and report.conflicting == [], describe(report)
    assert report.regenerated == [] and report.generations == report.accepted, describe(report)
    assert await read_topic(cluster.settings, cluster.topics.dlq) == [], "an outage sent records to the DLQ"
    # The fault hit results in flight: generations that finished while Postgres was down waited in the log
    # and were stored only after it came back.
    timings = await stage_times(cluster.settings, list(client.accepted))
    waited = [rid for rid, t in timings.items() if stopped_at < t["completed_at"] < restarting_at < t["stored_at"]]
    assert waited, "no result waited out the outage"
    for proc in cluster.procs.values():
        assert proc.popen.poll() is None, f"{proc.name} died during the outage"
    assert time.monotonic() - started <= FAULT_BUDGET_S


async def test_broker_paused_during_submits(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster("f7")
    start_pipeline(cluster)
    await cluster.wait_ready()
    started = time.monotonic()
    client = Client(cluster.url)
    submitting = asyncio.create_task(client.submit_many(long_bodies(200, "f7", low=64, high=128)))
    await eventually(lambda: truthy(len(client.accepted) >= 40), timeout=60, interval=0.02)

    assert cluster.broker_proc is not None
    cluster.broker_proc.send_signal(signal.SIGSTOP)
    before = len(client.accepted)
    await asyncio.sleep(8.0)
    accepted_while_paused = len(client.accepted) - before
    cluster.broker_proc.send_signal(signal.SIGCONT)

    await submitting
    assert accepted_while_paused > 0, "no submit was accepted while the broker was paused"
    await wait_all_terminal(cluster.settings, list(client.accepted), timeout=FAULT_BUDGET_S)
    report = await check(cluster.settings, list(client.accepted))
    assert report.accepted == 200
    assert report.lost == [] and report.conflicting == [], describe(report)
    assert report.regenerated == [] and report.generations == report.accepted, describe(report)
    # The submits accepted while the broker was paused went to the outbox (their produce timed out). Who
    # publishes them is a race, and either way is right: the relay, or the producer's own batch, sent when the
    # broker resumed and marked published by the tokenizer (a clean-clone run on 2026-12-03: 48 handed to
    # the outbox, all delivered by the producer, the relay found none). The relay itself is shown by
    # tests/integration/test_outbox.py.
    assert "the outbox relay will publish it" in cluster.procs["gw"].log.read_text()
    assert time.monotonic() - started <= FAULT_BUDGET_S
