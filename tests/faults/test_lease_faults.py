"""Lease faults (issue 7): the windows in which a worker used to generate a request twice, each hit on
purpose with a real stall of a real process, each counted by attempts (acknowledged ``running`` events).

(a) Redis paused (SIGSTOP of the test's own) for 2 s, shorter than the lease TTL, while a second worker
    watches the first one's work: a read error is never an expiry, a renewal error never a loss.
(c) A rebalance while a worker holds admitted work in preflight, the window widened by a real stall (the
    test's own Postgres stopped, so the terminal check hangs): admitted work stays tracked through the
    revocation, and the copies re-read after the partitions come back join it.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time

import pytest

from inferlog.embedded import EmbeddedPostgres, EmbeddedRedis
from inferlog.kafka import make_consumer, make_producer, publish_all
from inferlog.messages import GenerationParams, TokenizedRecord
from tests.conftest import TINY, eventually
from tests.faults.conftest import (
    FAULT_BUDGET_S,
    WORKER,
    MakeCluster,
    pause_postgres,
    resume_postgres,
    start_pipeline,
)
from tests.faults.harness import (
    Client,
    Cluster,
    check,
    describe,
    long_bodies,
    running_at_least,
    truthy,
    wait_all_terminal,
)

pytestmark = pytest.mark.faults


async def _counter_at_least(cluster: Cluster, names: tuple[str, ...], field: str, n: int) -> int | None:
    total = 0
    for name in names:
        load = await cluster.load(name)
        total += int(load.get(field, 0)) if load else 0
    return total if total >= n else None


async def test_redis_paused_while_a_second_worker_watches(make_cluster: MakeCluster,
                                                         own_redis: EmbeddedRedis) -> None:
    cluster = await make_cluster("fa", redis_url=own_redis.url)
    # Default 5 s leases (renewed every 1.7 s): a 2 s pause is shorter than any lease's remaining life.
    big = {**WORKER, "INFERLOG_WORKER_LEASE_TTL_MS": "5000", "INFERLOG_WORKER_MAX_RUNNING": "64",
           "INFERLOG_WORKER_NUM_BLOCKS": "512"}
    start_pipeline(cluster, workers=("w1",), **big)
    await cluster.wait_ready()
    started = time.monotonic()
    client = Client(cluster.url)
    # 72 requests of 380-450 tokens: w1 runs 64 at once for 40 s or more (about 10 tokens/s each at that
    # batch on this machine), so w2 joins while they run and watches the ones on its partitions, however
    # long its start takes. 200 requests of 170-270 tokens (the earlier shape) turned over w1's batch within
    # w2's start: a clean-clone run on 2026-12-04 never saw w2 watch 5.
    await client.submit_many(long_bodies(72, "fa", low=380, high=450))
    assert len(client.accepted) == 72
    await eventually(lambda: running_at_least(cluster, "w1", 60), timeout=60, interval=0.05)
    cluster.spawn("w2", "gpu-worker", **big)  # joins: w1's partitions move, w2 watches what w1 runs
    watched = await eventually(lambda: _counter_at_least(cluster, ("w2",), "watching", 5), timeout=60,
                               interval=0.05)
    print(f"w2 watches {watched} of w1's running requests when Redis pauses")

    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)
    await asyncio.sleep(2.0)
    own_redis.proc.send_signal(signal.SIGCONT)

    await wait_all_terminal(cluster.settings, list(client.accepted), timeout=FAULT_BUDGET_S)
    report = await check(cluster.settings, list(client.accepted))
    assert report.lost == [] and report.conflicting == [], describe(report)
    assert report.regenerated == [] and report.generations == report.accepted, describe(report)
    assert report.statuses == {"completed": 72}, describe(report)
    elapsed = time.monotonic() - started
    print(f"72 requests finished {elapsed:.0f} s after the first submit")
    assert elapsed <= FAULT_BUDGET_S


async def _produce_tokenized(cluster: Cluster, count: int, prefix: str) -> list[str]:
    """Tokenized records straight onto the interactive tier, as the tokenizer writes them (the tokenizer
    needs Postgres, which this fault has stopped)."""
    rng = random.Random(0)
    outgoing = [(cluster.topics.tokenized_interactive, f"{prefix}-{i}", TokenizedRecord(
        request_id=f"{prefix}-{i}", model=TINY, input_ids=[rng.randrange(3, 200) for _ in range(8)],
        params=GenerationParams(max_tokens=rng.randint(12, 24), ignore_eos=True))) for i in range(count)]
    producer = make_producer(cluster.settings.kafka_bootstrap)
    await producer.start()
    try:
        await publish_all(producer, outgoing)  # type: ignore[arg-type]
    finally:
        await producer.stop()
    return [request_id for _topic, request_id, _record in outgoing]


async def _rebalance(cluster: Cluster, group: str, settle_s: float = 1.0) -> None:
    """Force a rebalance of ``group`` and give its partitions back: a member joins (every partition is
    revoked and re-assigned, some to it), holds its share without fetching, and leaves (a second rebalance
    returns them). The workers see what a member joining or leaving under load does."""
    topics = cluster.topics
    member = make_consumer(cluster.settings.kafka_bootstrap, group, session_timeout_ms=6000)
    member.subscribe([topics.tokenized_interactive, topics.tokenized_batch])
    await member.start()
    try:
        await eventually(lambda: truthy(member.assignment()), timeout=20, interval=0.05)
        await asyncio.sleep(settle_s)
    finally:
        await member.stop()  # never fetched, never committed: leaves the group


async def test_rebalance_while_work_waits_in_preflight(make_cluster: MakeCluster,
                                                       own_postgres: EmbeddedPostgres) -> None:
    cluster = await make_cluster("fc", postgres_url=own_postgres.url)
    # One worker with room for every request and more: all 200 wait in preflight, and the copies it re-reads
    # after the rebalances are fetched while their originals still wait there (a worker that forgot its
    # admitted work on revocation would start those a second time).
    start_pipeline(cluster, workers=("w1",), INFERLOG_WORKER_MAX_RUNNING="256", INFERLOG_WORKER_NUM_BLOCKS="512")
    await cluster.wait_ready()
    started = time.monotonic()

    # Every terminal check hangs from here. Shorter than the worker's 10 s Postgres connect timeout, after
    # which a preflight gives up ("unknown", retried later) and the window would close.
    pause_postgres(own_postgres)
    try:
        accepted = await _produce_tokenized(cluster, 200, "fc")
        await eventually(lambda: _counter_at_least(cluster, ("w1",), "in_preflight", 100), timeout=5,
                         interval=0.05)
        await _rebalance(cluster, cluster.topics.group("gpu-workers"))
        await eventually(lambda: _counter_at_least(cluster, ("w1",), "revoked_in_preflight", 20), timeout=5,
                         interval=0.05)
        await asyncio.sleep(1.5)  # the partitions come back; w1 re-reads them while the originals wait
    finally:
        resume_postgres(own_postgres)

    await wait_all_terminal(cluster.settings, accepted, timeout=FAULT_BUDGET_S)
    report = await check(cluster.settings, accepted)
    assert report.lost == [] and report.conflicting == [], describe(report)
    assert report.regenerated == [] and report.generations == report.accepted, describe(report)
    assert report.statuses == {"completed": 200}, describe(report)
    assert time.monotonic() - started <= FAULT_BUDGET_S
