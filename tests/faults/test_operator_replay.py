"""Issue 10, replay: jobs accepted but never finished are re-published from a time window, exactly those,
each generated once; a second replay of the window re-publishes nothing and changes no stored result."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from inferlog.config import InferlogSettings
from inferlog.kafka import make_consumer
from tests.conftest import connect_to_schema, drop_schema, eventually, free_port, settings_env
from tests.faults.conftest import FAULT_BUDGET_S, MakeCluster, start_pipeline
from tests.faults.harness import Client, check, describe, ledger_rows, read_topic, wait_all_terminal

pytestmark = pytest.mark.faults


def inferlog(settings: InferlogSettings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``inferlog <args>`` as an operator runs it, with the cluster's settings."""
    return subprocess.run([sys.executable, "-m", "inferlog.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **settings_env(settings), **env}, timeout=120, check=False)


async def assert_store_is_the_logs_view(settings: InferlogSettings) -> None:
    """``inferlog rebuild-store`` into a scratch schema finds no difference with the live store."""
    schema = f"{settings.postgres_schema}_rebuilt"
    try:
        rebuilt = inferlog(settings, "rebuild-store", "--into-schema", schema, "--json")
        assert rebuilt.returncode == 0, (rebuilt.stdout[-3000:], rebuilt.stderr)
    finally:
        await drop_schema(schema)


async def skip_to_end(settings: InferlogSettings, group: str, topics: list[str]) -> None:
    """Commit ``group``'s offsets at the high-water mark of every partition of ``topics`` (the group has no
    member): what it has not read yet it never will, the way a lost consumer-group state or a bad reset
    (``--to-latest``) leaves accepted jobs on the log that no worker will take."""
    consumer = make_consumer(settings.kafka_bootstrap, group)
    await consumer.start()
    try:
        consumer.subscribe(topics)  # as a member: this broker refuses commits from outside the group
        deadline = time.monotonic() + 60
        while not consumer.assignment() or any(consumer.highwater(tp) is None for tp in consumer.assignment()):
            await consumer.getmany(timeout_ms=200, max_records=1)
            assert time.monotonic() < deadline, "not assigned, or high-water marks not learned, in time"
        await consumer.commit({tp: consumer.highwater(tp) or 0 for tp in consumer.assignment()})
    finally:
        await consumer.stop()


async def stored_results(settings: InferlogSettings) -> list[dict[str, Any]]:
    """Every column of every stored result."""
    conn = await connect_to_schema(settings)
    try:
        return [dict(r) for r in await conn.fetch("SELECT * FROM results ORDER BY request_id")]
    finally:
        await conn.close()


def body(i: int, **extra: object) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"Replay request {i}."}], "max_tokens": 16, **extra}


async def test_replay_republishes_exactly_the_unfinished_jobs(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster("rp")
    settings, topics = cluster.settings, cluster.topics
    start_pipeline(cluster)
    await cluster.wait_ready()
    since = time.time() - 1
    client = Client(cluster.url)
    await client.submit_many({f"done-{i}": body(i) for i in range(5)})
    done = sorted(client.accepted)
    await wait_all_terminal(settings, done, timeout=FAULT_BUDGET_S)

    # The worker goes; 8 more are accepted and tokenized; then the worker group's position skips past them.
    cluster.signal("w", signal.SIGTERM)
    cluster.procs["w"].popen.wait(timeout=60)
    stuck_bodies = {f"stuck-{i}": body(i) for i in range(7)} | {"stuck-late": body(7, deadline_s=3)}
    await client.submit_many(stuck_bodies)
    stuck = sorted(stuck_bodies)
    until = time.time() + 1

    async def all_tokenized() -> bool:
        keys = {k.decode() for k, _v in await read_topic(settings, topics.tokenized_interactive) if k}
        return set(stuck) <= keys

    await eventually(all_tokenized, timeout=60, interval=0.5)
    await skip_to_end(settings, topics.group("gpu-workers"), [topics.tokenized_interactive, topics.tokenized_batch])
    cluster.restart("w")
    await cluster.wait_ready()
    await asyncio.sleep(4)  # the worker is back, and the deadline of stuck-late passes meanwhile
    assert all(r["status"] == "tokenized" for r in (await ledger_rows(settings, stuck)).values()), \
        "the skipped jobs must still be open: the scenario did not strand them"
    requests_on_log = len(await read_topic(settings, topics.requests))

    # The dry run lists exactly the stranded jobs and changes nothing.
    window = ("--since", str(since), "--until", str(until))
    dry = inferlog(settings, "replay", *window, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert sorted(planned["republished"]) == stuck and planned["already_terminal"] == len(done), planned
    assert planned["deadline_passed"] == ["stuck-late"] and planned["not_on_log"] == [], planned
    assert planned["missing_payload"] == [] and planned["conflicts"] == [], planned
    assert len(await read_topic(settings, topics.requests)) == requests_on_log, "a dry run produced records"
    assert all(r["replays"] == 0 for r in (await ledger_rows(settings, stuck)).values())

    replayed = inferlog(settings, "replay", *window, "--json")
    assert replayed.returncode == 0, replayed.stderr
    report = json.loads(replayed.stdout)
    assert sorted(report["republished"]) == stuck and report["deadline_passed"] == ["stuck-late"], report
    everything = done + stuck
    await wait_all_terminal(settings, everything, timeout=FAULT_BUDGET_S)
    result = await check(settings, everything)
    assert result.lost == [] and result.conflicting == [], describe(result)
    assert result.statuses == {"completed": 12, "expired": 1}, describe(result)
    # Each completed job generated once (the replayed ones after the replay, the others before); the
    # expired one never reached a worker.
    assert result.generations_by_id == {rid: 1 for rid in everything if rid != "stuck-late"}, describe(result)
    assert all(r["replays"] == 1 for r in (await ledger_rows(settings, stuck)).values())

    # The same window again: nothing to re-publish, nothing generated, no stored result changed.
    before = await stored_results(settings)
    on_log = len(await read_topic(settings, topics.requests))
    again = inferlog(settings, "replay", *window, "--json")
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["republished"] == [] and second["already_terminal"] == len(everything), second
    await asyncio.sleep(3)
    assert await stored_results(settings) == before
    assert len(await read_topic(settings, topics.requests)) == on_log
    assert (await check(settings, everything)).generations == result.generations

    # Bad input: one clear line, a non-zero exit, nothing changed.
    replays = {k: r["replays"] for k, r in (await ledger_rows(settings, everything)).items()}
    for args, env, expected in [
        (("--since", str(until), "--until", str(since)), {}, "is after --until"),
        (("--status", "completed"), {}, "invalid choice"),
        (("--since", "yesterday-ish"), {}, "neither ISO-8601"),
        ((), {"INFERLOG_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}, "did not answer"),
        ((), {"INFERLOG_POSTGRES_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"}, ""),
    ]:
        bad = inferlog(settings, "replay", *args, **env)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode != 0 and len(lines) == 1 and expected in lines[0], (args, env, bad.stderr)
        assert "Traceback" not in bad.stderr
    assert {k: r["replays"] for k, r in (await ledger_rows(settings, everything)).items()} == replays
    assert await stored_results(settings) == before

    # After the outage and the replays, the store is still the log's view: rebuilt from it, it agrees.
    await assert_store_is_the_logs_view(settings)
