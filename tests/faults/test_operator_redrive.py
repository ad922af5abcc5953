"""Issue 10, redrive: the broker loses its whole log (Tansu restarted empty) with 100 accepted jobs on it and
no worker running (and one more is accepted during the outage). The services notice and stop (no consumer runs on a topic nobody created), wait for
`inferlog topics`, and `inferlog redrive` brings every job back from the ledger: each ends once, generated
once (attempt events on the new log), the topics as configured; a second redrive does nothing."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from inferlog.epoch import BROKER_CHANGED_EXIT, inspect_broker
from inferlog.kafka import make_consumer
from inferlog.topics import group_is_consuming
from tests.conftest import connect_to_schema, eventually
from tests.faults.conftest import FAULT_BUDGET_S, WORKER, MakeCluster
from tests.faults.harness import Client, check, describe, read_topic, wait_all_terminal
from tests.faults.test_operator_replay import inferlog

pytestmark = pytest.mark.faults

CHECK = {"INFERLOG_BROKER_CHECK_INTERVAL_S": "0.5"}


async def broker_topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def open_in_ledger(settings, ids: list[str]) -> int:  # type: ignore[no-untyped-def]
    conn = await connect_to_schema(settings)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM requests q LEFT JOIN results r USING (request_id) "
            "WHERE q.request_id = ANY($1::text[]) AND r.request_id IS NULL", ids))
    finally:
        await conn.close()


async def test_redrive_after_the_broker_lost_its_log(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster("rd")
    settings, topics = cluster.settings, cluster.topics
    for name, service in (("store", "result-store"), ("tok", "tokenizer"), ("gw", "gateway")):
        cluster.spawn(name, service, **CHECK)
    await cluster.wait_ready()
    client = Client(cluster.url)
    await client.submit_many({f"lost-{i}": {"messages": [{"role": "user", "content": f"Redrive {i}."}],
                                            "max_tokens": 12} for i in range(100)})
    accepted = sorted(client.accepted)
    assert len(accepted) == 100

    async def all_tokenized() -> bool:
        keys = {k.decode() for k, _v in await read_topic(settings, topics.tokenized_interactive) if k}
        return set(accepted) <= keys

    await eventually(all_tokenized, timeout=60, interval=0.5)

    # The broker loses everything. The consuming services notice within a few checks and exit (status 4)
    # rather than run on whatever the broker now holds; nothing re-creates a topic by asking for it.
    cluster.restart_broker()
    lost_at = time.monotonic()
    for name in ("tok", "store"):
        await eventually(lambda name=name: _exited(cluster, name), timeout=30, interval=0.1)
        assert cluster.procs[name].popen.returncode == BROKER_CHANGED_EXIT, name
    noticed_s = time.monotonic() - lost_at
    # A client submits meanwhile: accepted (the ledger has it; the gateway's produce to the missing topic
    # fails and the outbox keeps it), and the gateway's producer does not create the topic by asking for it.
    await client.submit_many({"during-outage": {"messages": [{"role": "user", "content": "Redrive me too."}],
                                                "max_tokens": 12}})
    accepted = sorted(client.accepted)
    assert len(accepted) == 101
    # A consumer subscribed to a missing topic (what a service's consumer is until its guard notices): aiokafka
    # asks with allow_auto_topic_creation, which inferlog.kafka turns off; with it on, Tansu made the topic.
    consumer = make_consumer(settings.kafka_bootstrap, "bystander")
    await consumer.start()
    try:
        consumer.subscribe([topics.requests])
        for _ in range(10):
            await consumer.getmany(timeout_ms=200)
    finally:
        await consumer.stop()
    assert await broker_topics(settings.kafka_bootstrap) == set(), "a client created a topic by asking for it"

    # Restarted (as `inferlog up` or any supervisor does), they wait for `inferlog topics`: still running,
    # consuming nothing, creating nothing.
    for name in ("tok", "store"):
        cluster.restart(name)
    await asyncio.sleep(4)
    assert all(cluster.procs[n].popen.poll() is None for n in ("tok", "store"))
    assert await broker_topics(settings.kafka_bootstrap) == set()
    assert await open_in_ledger(settings, accepted) == 101

    # A client outside inferlog re-creates one topic with the broker's default partition count: `inferlog
    # topics` refuses it by name, and `--repair` deletes and re-creates it.
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topics.requests, topics.partitions + 2, 1)])
    await admin.close()
    refused = inferlog(settings, "topics")
    assert refused.returncode != 0 and topics.requests in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    repaired = inferlog(settings, "topics", "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert f"{topics.requests}: {topics.partitions} partitions (re-created)" in repaired.stdout, repaired.stdout
    assert "(new: the broker's log starts here" in repaired.stdout
    state = await inspect_broker(settings.kafka_bootstrap, topics)
    assert state.sound and state.epoch is not None, state

    dry = inferlog(settings, "redrive", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert sorted(json.loads(dry.stdout)["redriven"]) == accepted
    assert len(await read_topic(settings, topics.requests)) == 0, "a dry run produced records"
    redriven = inferlog(settings, "redrive", "--json")
    assert redriven.returncode == 0, redriven.stderr
    report = json.loads(redriven.stdout)
    assert sorted(report["redriven"]) == accepted and report["epoch"] == state.epoch, report
    assert report["missing_payload"] == [] and report["deadline_passed"] == [], report

    cluster.spawn("w", "gpu-worker", **WORKER, **CHECK)
    await wait_all_terminal(settings, accepted, timeout=FAULT_BUDGET_S)
    result = await check(settings, accepted)
    assert result.lost == [] and result.conflicting == [], describe(result)
    assert result.statuses == {"completed": 101}, describe(result)
    assert result.generations_by_id == {rid: 1 for rid in accepted}, describe(result)
    assert await group_is_consuming(settings.kafka_bootstrap, topics.group("tokenizer"))
    final = await inspect_broker(settings.kafka_bootstrap, topics)
    assert final.sound and final.epoch == state.epoch, final

    # Again: nothing open, nothing re-driven, nothing produced.
    on_log = len(await read_topic(settings, topics.requests))
    again = inferlog(settings, "redrive", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["redriven"] == []
    assert len(await read_topic(settings, topics.requests)) == on_log
    print(f"services noticed the lost log in {noticed_s:.1f} s; 101 jobs re-driven, generated once each")


async def _exited(cluster, name: str) -> bool:  # type: ignore[no-untyped-def]
    return cluster.procs[name].popen.poll() is not None
