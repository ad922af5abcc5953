"""Faults 1, 2 and 8: a worker killed mid-batch, a worker stopped gracefully, workers added and removed."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.conftest import eventually
from tests.faults.conftest import FAULT_BUDGET_S, WORKER, MakeCluster, start_pipeline
from tests.faults.harness import (
    Client,
    check,
    describe,
    lease_expiries,
    long_bodies,
    running_at_least,
    tail,
    wait_all_terminal,
)

pytestmark = pytest.mark.faults



async def test_sigkill_worker_mid_batch_loses_nothing(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster("f1")
    start_pipeline(cluster)
    await cluster.wait_ready()
    started = time.monotonic()
    client = Client(cluster.url)
    submitting = asyncio.create_task(client.submit_many(long_bodies(200, "f1")))

    await eventually(lambda: running_at_least(cluster, "w", 10), timeout=60, interval=0.05)
    victim = cluster.worker_id("w")
    killed_at = time.time()
    cluster.signal("w", signal.SIGKILL)
    left = await lease_expiries(cluster.settings, victim)  # nothing renews them now
    cluster.restart("w")
    await submitting
    await wait_all_terminal(cluster.settings, list(client.accepted), timeout=FAULT_BUDGET_S)

    report = await check(cluster.settings, list(client.accepted))
    elapsed = time.monotonic() - started
    interrupted = report.interrupted(victim)
    assert report.accepted == 200, describe(report)
    assert report.lost == [], describe(report)
    assert report.conflicting == [], describe(report)
    assert len(interrupted) >= 10, "the kill did not hit work in flight"
    assert set(report.regenerated) <= interrupted, "only the victim's in-flight work may be generated twice"
    assert report.generations == report.accepted + len(report.regenerated), describe(report)
    assert report.regenerated, "no interrupted request was redelivered and generated again"
    assert left, "the kill left no live lease"
    assert report.early_retries(killed_at) == {}, "a request was attempted twice before the kill"
    assert report.taken_over_early(left) == {}, "taken over while its lease lived"
    assert elapsed <= FAULT_BUDGET_S, f"took {elapsed:.0f}s"


async def test_sigterm_worker_finishes_its_batch_and_nothing_runs_twice(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster("f2")
    start_pipeline(cluster, workers=("w", "w2"), INFERLOG_WORKER_SHUTDOWN_GRACE_S="60")
    await cluster.wait_ready()
    started = time.monotonic()
    client = Client(cluster.url)
    submitting = asyncio.create_task(client.submit_many(long_bodies(200, "f2")))

    await eventually(lambda: running_at_least(cluster, "w", 10), timeout=60, interval=0.05)
    leaving = cluster.worker_id("w")
    cluster.signal("w", signal.SIGTERM)
    await submitting
    await wait_all_terminal(cluster.settings, list(client.accepted), timeout=FAULT_BUDGET_S)
    code = await asyncio.to_thread(cluster.procs["w"].popen.wait, 60)

    report = await check(cluster.settings, list(client.accepted))
    assert report.accepted == 200, describe(report)
    elapsed = time.monotonic() - started
    assert code == 0, tail(cluster.procs["w"].log)
    assert report.lost == [] and report.conflicting == [], describe(report)
    assert len(report.attempted_by.get(leaving, ())) >= 10
    assert report.interrupted(leaving) == set(), "the stopping worker left generations unfinished"
    assert report.regenerated == [], "a request was generated twice"
    assert report.generations == report.accepted
    assert elapsed <= FAULT_BUDGET_S, f"took {elapsed:.0f}s"


async def test_workers_added_and_removed_under_traffic(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster("f8")
    # w1's engine is slowed (10 ms a step, through the test hook) so its generations outlive w2's start and
    # the ~3 s rebalance: on the tiny model a whole batch can end inside that window, leaving w2 nothing of
    # w1's in flight to watch (the fault then tests nothing).
    start_pipeline(cluster, workers=("w1",), INFERLOG_WORKER_TEST_HOOKS="tests.faults.engine_hooks",
                   INFERLOG_TEST_ENGINE_STEP_DELAY_S="0.01")
    await cluster.wait_ready()
    started = time.monotonic()
    client = Client(cluster.url)
    submitting = asyncio.create_task(client.submit_many(long_bodies(200, "f8", low=200, high=450)))

    await eventually(lambda: running_at_least(cluster, "w1", 10), timeout=60, interval=0.05)
    cluster.spawn("w2", "gpu-worker", **WORKER)  # added: the group rebalances under load

    async def w2_watching() -> bool:
        # w2 re-read records whose generations w1 still runs under its lease (their partitions moved).
        return "watching" in tail(cluster.procs["w2"].log, 2000)

    await eventually(w2_watching, timeout=60, interval=0.05)
    removed = cluster.worker_id("w1")
    killed_at = time.time()
    cluster.signal("w1", signal.SIGKILL)  # removed, with its leases
    left = await lease_expiries(cluster.settings, removed)  # nothing renews them now
    await submitting
    await wait_all_terminal(cluster.settings, list(client.accepted), timeout=FAULT_BUDGET_S)

    report = await check(cluster.settings, list(client.accepted))
    assert report.accepted == 200, describe(report)
    elapsed = time.monotonic() - started
    assert report.lost == [] and report.conflicting == [], describe(report)
    interrupted = report.interrupted(removed)
    assert interrupted, "removing w1 hit no work in flight"
    assert set(report.regenerated) <= interrupted, describe(report)
    assert report.generations == report.accepted + len(report.regenerated), describe(report)
    assert left, "w1 left no live lease"
    assert report.early_retries(killed_at) == {}, "a request was attempted twice while both workers lived"
    assert report.taken_over_early(left) == {}, "taken over while its lease lived"
    assert "taking over" in tail(cluster.procs["w2"].log, 2000), "w2 never took over an expired lease"
    assert elapsed <= FAULT_BUDGET_S, f"took {elapsed:.0f}s"
