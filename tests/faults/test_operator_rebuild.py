"""Issue 10, rebuild-store: the result store rebuilt from the log into a fresh schema is the live store,
column by column for what the log carries; a live row changed behind the log's back is reported as exactly
that difference; the earliest record seen is reported."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from inferlog.kafka import make_producer
from tests.conftest import TINY, connect_to_schema, drop_schema
from tests.faults.conftest import FAULT_BUDGET_S, MakeCluster, start_pipeline
from tests.faults.harness import Client, check, describe, wait_all_terminal
from tests.faults.test_operator_replay import inferlog

pytestmark = pytest.mark.faults


def bodies() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {f"rb-{i}": {"prompt": f"Rebuild {i}.", "max_tokens": 6 + i % 5}
                                      for i in range(8)}
    out["rb-chat"] = {"messages": [{"role": "user", "content": "Rebuild a chat."}], "max_tokens": 8}
    out["rb-sampled"] = {"prompt": "Rebuild, sampled.", "max_tokens": 8, "temperature": 0.8}
    return out


async def test_the_store_rebuilt_from_the_log_is_the_live_store(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster("rb")
    settings, topics = cluster.settings, cluster.topics
    start_pipeline(cluster)
    await cluster.wait_ready()
    started = time.time()
    client = Client(cluster.url)
    await client.submit_many(bodies())
    producer = make_producer(settings.kafka_bootstrap)
    await producer.start()
    try:  # a direct producer's job, and a record that never reads (its ID ends failed)
        await producer.send_and_wait(topics.requests, json.dumps({
            "request_id": "rb-direct", "model": TINY, "params": {"max_tokens": 5}, "prompt": "Direct."}).encode(),
            key=b"rb-direct")
        await producer.send_and_wait(topics.requests, b'{"request_id": "rb-broken", "model": "x"}', key=b"rb-broken")
    finally:
        await producer.stop()
    jobs = sorted([*client.accepted, "rb-direct", "rb-broken"])
    await wait_all_terminal(settings, jobs, timeout=FAULT_BUDGET_S)
    result = await check(settings, sorted(client.accepted))
    assert result.lost == [] and result.statuses == {"completed": 10}, describe(result)

    schema = f"{settings.postgres_schema}_rebuilt"
    try:
        done = inferlog(settings, "rebuild-store", "--into-schema", schema, "--json")
        assert done.returncode == 0, (done.stdout, done.stderr)
        report = json.loads(done.stdout)
        assert report["consistent"] and report["differences"] == [], report
        assert report["rebuilt_jobs"] == len(jobs) == report["identical"], report
        assert report["only_live"] == [] and report["only_rebuilt"] == [], report
        seen = report["topics"][topics.requests]
        assert seen["records"] == len(jobs) and seen["unreadable"] == 1, report
        assert started - 60 < seen["earliest"] <= time.time(), report
        assert report["topics"][topics.results]["records"] >= len(jobs), report

        # A live result changed behind the log's back, and a live job the log never held (claimed, never
        # published): the first is a difference, the second only in the live store, and never published.
        conn = await connect_to_schema(settings)
        try:
            await conn.execute("UPDATE results SET text = 'tampered', completion_tokens = 99 WHERE request_id = 'rb-3'")
            await conn.execute("INSERT INTO requests (request_id, status, status_rank, published) "
                               "VALUES ('rb-unpublished', 'received', 0, false)")
        finally:
            await conn.close()
        again = inferlog(settings, "rebuild-store", "--into-schema", schema, "--json")
        assert again.returncode != 0 and "not empty" in again.stderr and len(again.stderr.strip().splitlines()) == 1
        again = inferlog(settings, "rebuild-store", "--into-schema", schema, "--replace", "--json")
        assert again.returncode == 3, (again.stdout, again.stderr)
        second = json.loads(again.stdout)
        assert {(d["job"], d["column"]) for d in second["differences"]} == {("rb-3", "text"),
                                                                             ("rb-3", "completion_tokens")}, second
        assert [d["live"] for d in second["differences"] if d["column"] == "text"] == ["tampered"], second
        assert second["only_live"] == ["rb-unpublished"] and second["only_live_unpublished"] == 1, second
        plain = inferlog(settings, "rebuild-store", "--into-schema", schema, "--replace")
        assert plain.returncode == 3 and "tampered" in plain.stdout and "earliest record" in plain.stdout, plain

        for args, expected in [(("--into-schema", settings.postgres_schema), "is the live schema"),
                               (("--into-schema", "Bad-Name"), "schema name")]:
            bad = inferlog(settings, "rebuild-store", *args)
            lines = bad.stderr.strip().splitlines()
            assert bad.returncode != 0 and len(lines) == 1 and expected in lines[0], (args, bad.stderr)
    finally:
        await drop_schema(schema)
