"""Issue 10, the dead-letter queue: `inferlog dlq list|show|redrive`. Five kinds of dead letter from the
tokenizer (a bad deploy's too-low max_tokens limit, an ID reused with another payload, the same with a
record too big for the dead letter to hold, a model nobody serves, a record that never reads); once the
deploy is fixed, a re-drive runs each re-drivable one again as a new job linked both ways to its original,
whose first result stays as it was. A re-drive that fails again is dead-lettered once, never looped; a
second re-drive does nothing."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import httpx
import pytest

from inferlog.kafka import make_producer
from tests.conftest import TINY, connect_to_schema, eventually
from tests.faults.conftest import FAULT_BUDGET_S, MakeCluster, start_pipeline
from tests.faults.harness import Client, check, describe, read_topic, wait_all_terminal
from tests.faults.test_operator_replay import assert_store_is_the_logs_view, inferlog

pytestmark = pytest.mark.faults


def direct(request_id: str, *, pad: int = 0, **fields: Any) -> bytes:
    """A direct producer's record; ``pad`` spaces inside it make it too long for a dead letter to keep
    whole (and its prefix unreadable), while it still parses."""
    record: dict[str, Any] = {"request_id": request_id, "model": TINY, "params": {"max_tokens": 8},
                              "messages": [{"role": "user", "content": f"Dead letter {request_id}."}], **fields}
    text = json.dumps(record)
    return (text[:-1] + " " * pad + "}").encode()


async def stored(settings: Any, key: str) -> dict[str, Any]:
    conn = await connect_to_schema(settings)
    try:
        row = await conn.fetchrow("SELECT * FROM results WHERE request_id = $1", key)
        return dict(row) if row else {}
    finally:
        await conn.close()


def run_json(settings: Any, *args: str) -> dict[str, Any]:
    done = inferlog(settings, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


async def test_dead_letters_listed_shown_and_redriven_once(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster("dq")
    settings, topics = cluster.settings, cluster.topics
    start_pipeline(cluster)
    cluster.procs["tok"].popen.terminate()  # the bad deploy: a tokenizer that refuses max_tokens over 4
    cluster.procs["tok"].popen.wait(timeout=60)
    cluster.spawn("tok", "tokenizer", INFERLOG_TOKENIZER_MAX_MAX_TOKENS="4")
    await cluster.wait_ready()
    client = Client(cluster.url)
    await client.submit_many({"orig": {"prompt": "The original.", "max_tokens": 4},
                              "orig-big": {"prompt": "The big one's original.", "max_tokens": 4}})
    originals = sorted(client.accepted)
    await wait_all_terminal(settings, originals, timeout=FAULT_BUDGET_S)
    before = {k: await stored(settings, k) for k in originals}
    assert all(row["status"] == "completed" for row in before.values()), before

    producer = make_producer(settings.kafka_bootstrap, max_request_size=8_000_000)
    await producer.start()
    try:
        for key, value in [
            ("big-ask", direct("big-ask")),  # max_tokens 8 > 4: refused by the bad deploy
            ("orig", direct("orig")),  # another payload under a taken ID
            ("orig-big", direct("orig-big", pad=20_000)),  # the same, too big for its dead letter to hold
            ("no-model", direct("no-model", model="not-served")),
            ("broken", b'{"request_id": "broken", "model": "tiny-llama"}'),  # no params: never reads
        ]:
            await producer.send_and_wait(topics.requests, value, key=key.encode())
    finally:
        await producer.stop()

    async def dead_letters(count: int) -> list[tuple[bytes | None, bytes]] | None:
        found = await read_topic(settings, topics.dlq)
        return found if len(found) >= count else None

    await eventually(lambda: dead_letters(5), timeout=60, interval=0.5)

    async def refusals_stored() -> bool:  # a job is re-drivable once its failed result is stored, not before
        return [(await stored(settings, key)).get("status") for key in ("big-ask", "no-model")] == ["failed"] * 2

    await eventually(refusals_stored, timeout=30, interval=0.2)
    listed = run_json(settings, "dlq", "list")
    by_job = {d["request_id"]: d for d in listed["dead_letters"]}
    assert sorted(by_job) == ["big-ask", "broken", "no-model", "orig", "orig-big"], listed
    assert by_job["orig-big"]["truncated"] is True and by_job["orig"]["error"].startswith("conflict"), by_job
    assert {k: d["state"] for k, d in by_job.items()} == {
        "big-ask": "re-drivable", "orig": "re-drivable", "orig-big": "re-drivable", "no-model": "re-drivable",
        "broken": "not re-drivable"}, by_job
    assert "params" in by_job["broken"]["detail"], by_job["broken"]
    plain = inferlog(settings, "dlq", "list")
    assert plain.returncode == 0 and "orig-big" in plain.stdout and "not re-drivable" in plain.stdout, plain
    print(plain.stdout)
    filtered = run_json(settings, "dlq", "list", "--reason", "CONFLICT")
    assert sorted(d["request_id"] for d in filtered["dead_letters"]) == ["orig", "orig-big"], filtered

    # The deploy is fixed: the tokenizer allows max_tokens 8 again.
    cluster.signal("tok", signal.SIGTERM)
    cluster.procs["tok"].popen.wait(timeout=60)
    cluster.spawn("tok", "tokenizer")
    await cluster.wait_ready()

    requests_on_log = len(await read_topic(settings, topics.requests))
    dry = run_json(settings, "dlq", "redrive", "--dry-run")
    assert sorted(r["original"] for r in dry["redriven"]) == ["big-ask", "no-model", "orig", "orig-big"], dry
    assert [n["position"] for n in dry["not_redrivable"]] == [by_job["broken"]["position"]], dry
    assert len(await read_topic(settings, topics.requests)) == requests_on_log, "a dry run produced records"

    report = run_json(settings, "dlq", "redrive")
    new = {r["original"]: r["redriven_as"] for r in report["redriven"]}
    assert new == {k: f"{k}.redrive-1" for k in ("big-ask", "no-model", "orig", "orig-big")}, report
    fixed = ["big-ask.redrive-1", "orig.redrive-1", "orig-big.redrive-1"]
    await wait_all_terminal(settings, [*fixed, "no-model.redrive-1"], timeout=FAULT_BUDGET_S)
    result = await check(settings, [*originals, *fixed])
    assert result.lost == [] and result.conflicting == [], describe(result)
    assert result.statuses == {"completed": 5}, describe(result)
    assert result.generations_by_id == {k: 1 for k in [*originals, *fixed]}, describe(result)
    assert {k: await stored(settings, k) for k in originals} == before, "a re-drive changed an original's result"

    # Each poll shows the link: the original's (answered from Redis: refreshed by the re-drive) and the new one's.
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        for original in ("orig", "orig-big"):
            polled = (await http.get(f"/v1/requests/{original}")).json()
            assert polled["redriven_as"] == [f"{original}.redrive-1"] and polled["status"] == "completed", polled
            again = (await http.get(f"/v1/requests/{original}.redrive-1")).json()
            assert again["redrive_of"] == original and again["status"] == "completed", again

    # The model is still not served: its re-drive fails again, is dead-lettered once, and stays there.
    assert (await stored(settings, "no-model.redrive-1"))["status"] == "failed"
    await eventually(lambda: dead_letters(6), timeout=30, interval=0.5)
    shown = run_json(settings, "dlq", "show", by_job["orig"]["position"])
    assert shown["state"] == "re-driven" and shown["detail"] == "orig.redrive-1", shown
    assert shown["redriven_as"] == ["orig.redrive-1"] and shown["job_status"] == "completed", shown

    plain = inferlog(settings, "dlq", "show", by_job["orig-big"]["position"])
    assert plain.returncode == 0 and "re-driven as orig-big.redrive-1" in plain.stdout, plain
    print(plain.stdout)
    second = run_json(settings, "dlq", "redrive")
    assert second["redriven"] == [] and len(second["already_redriven"]) == 4, second
    assert [f["redrive_of"] for f in second["failed_again"]] == ["no-model"], second
    on_log = len(await read_topic(settings, topics.requests))
    await asyncio.sleep(3)
    assert len(await read_topic(settings, topics.dlq)) == 6, "a re-drive looped"
    assert len(await read_topic(settings, topics.requests)) == on_log
    assert (await check(settings, [*originals, *fixed])).generations == result.generations

    # Bad input: one clear line, a non-zero exit.
    for args, expected in [(("show", "99:99"), "no dead letter at 99:99"), (("show", "x:y"), "not a dead letter"),
                           (("redrive", "--extend-deadline", "-1"), "extend-deadline")]:
        bad = inferlog(settings, "dlq", *args)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode != 0 and len(lines) == 1 and expected in lines[0], (args, bad.stderr)

    # The store is still the log's view after all this (conflicts, refusals, re-drives): rebuilt, it agrees.
    await assert_store_is_the_logs_view(settings)
