"""Engine faults (issue 7): an engine that crashes or hangs mid-run is never its requests' fault — the
worker publishes nothing for them, leaves them uncommitted, exits non-zero and is restarted, and they are
taken over; a request that takes the engine down on every attempt ends ``failed`` (``engine_error``)
after K attempts while everything else completes. The faults come from a hook module that only the tests
name (``INFERLOG_WORKER_TEST_HOOKS``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from inferlog.messages import DeadLetter, ResultRecord, Status
from tests.conftest import eventually
from tests.faults.conftest import FAULT_BUDGET_S, WORKER, MakeCluster, start_pipeline
from tests.faults.harness import (
    Client,
    Cluster,
    check,
    describe,
    long_bodies,
    read_topic,
    tail,
    wait_all_terminal,
)

pytestmark = pytest.mark.faults

HOOKS = {"INFERLOG_WORKER_TEST_HOOKS": "tests.faults.engine_hooks"}
WATCHDOG_S = 3.0
ENGINE_FAILED_EXIT = 3


async def _restart_failed_workers(cluster: Cluster, names: tuple[str, ...], exits: list[tuple[str, int, float]],
                                  **env: str) -> None:
    """The supervisor's job (``inferlog up`` does it): restart a worker that exited; record each exit."""
    while True:
        for name in names:
            code = cluster.procs[name].popen.poll()
            if code is not None:
                exits.append((cluster.worker_id(name), code, time.time()))
                proc = cluster.procs[name]
                cluster.spawn(name, "gpu-worker", **{**proc.env, **env})
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("fault", ["fail", "hang"])
async def test_an_engine_that_fails_or_hangs_mid_run_costs_its_requests_nothing(
        make_cluster: MakeCluster, tmp_path: Path, fault: str) -> None:
    cluster = await make_cluster(f"e{fault}")
    fired = tmp_path / "fired"
    start_pipeline(cluster, workers=("w2",), INFERLOG_WORKER_MAX_ENGINE_FAILURES="3")
    cluster.spawn("w1", "gpu-worker", **{
        **WORKER, **HOOKS, "INFERLOG_WORKER_ENGINE_WATCHDOG_S": str(WATCHDOG_S),
        # K = 3: one engine failure makes no request a suspect, so the interrupted work reruns batched.
        "INFERLOG_WORKER_MAX_ENGINE_FAILURES": "3",
        "INFERLOG_TEST_ENGINE_FAULT": fault, "INFERLOG_TEST_ENGINE_FAULT_AFTER_STEPS": "20",
        "INFERLOG_TEST_ENGINE_FAULT_MIN_ACTIVE": "10", "INFERLOG_TEST_ENGINE_FAULT_ONCE": str(fired)})
    await cluster.wait_ready()
    started = time.monotonic()
    broken = cluster.worker_id("w1")
    client = Client(cluster.url)
    exits: list[tuple[str, int, float]] = []
    supervising = asyncio.create_task(_restart_failed_workers(cluster, ("w1",), exits))
    try:
        await client.submit_many(long_bodies(200, f"e{fault}"))
        await wait_all_terminal(cluster.settings, list(client.accepted), timeout=FAULT_BUDGET_S)
    finally:
        supervising.cancel()

    assert fired.exists(), "the engine fault never fired"
    fired_at = float(fired.read_text())
    report = await check(cluster.settings, list(client.accepted))
    elapsed = time.monotonic() - started
    assert report.accepted == 200, describe(report)
    assert report.lost == [] and report.conflicting == [], describe(report)
    assert report.statuses == {"completed": 200}, describe(report)
    [(who, code, exited_at)] = exits
    assert who == broken and code == ENGINE_FAILED_EXIT, tail(cluster.procs["w1"].log)
    assert exited_at - fired_at <= (WATCHDOG_S if fault == "hang" else 0) + 5, (exited_at - fired_at)
    interrupted = report.interrupted(broken)
    assert len(interrupted) >= 10, "the fault hit no work in flight"
    assert set(report.regenerated) == interrupted, describe(report)
    assert report.generations == report.accepted + len(interrupted), describe(report)
    for rid in interrupted:
        first, second = report.attempt_times[rid]
        assert second > fired_at, f"{rid} was attempted again before the engine failed"
    assert elapsed <= FAULT_BUDGET_S, f"took {elapsed:.0f}s"


async def test_a_request_that_fails_every_engine_ends_failed_after_k_attempts(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster("epoison")
    poison = "ep-7"
    env = {**WORKER, **HOOKS, "INFERLOG_TEST_ENGINE_POISON": poison, "INFERLOG_WORKER_MAX_ENGINE_FAILURES": "2"}
    cluster.spawn("store", "result-store")
    for name in ("w1", "w2"):
        cluster.spawn(name, "gpu-worker", **env)
    cluster.spawn("tok", "tokenizer")
    cluster.spawn("gw", "gateway")
    await cluster.wait_ready()
    started = time.monotonic()
    client = Client(cluster.url)
    exits: list[tuple[str, int, float]] = []
    supervising = asyncio.create_task(_restart_failed_workers(cluster, ("w1", "w2"), exits))
    bodies = long_bodies(200, "ep")
    try:
        # The poison first, alone: a request that failed once runs alone after that (quarantine), so only a
        # failure it caused by itself can end it; the others follow while it crash-loops its K attempts.
        await client.submit_many({poison: bodies.pop(poison)})
        await eventually(lambda: _exited(exits), timeout=60, interval=0.1)
        await client.submit_many(bodies)
        await wait_all_terminal(cluster.settings, list(client.accepted), timeout=FAULT_BUDGET_S)
    finally:
        supervising.cancel()

    report = await check(cluster.settings, list(client.accepted))
    assert report.accepted == 200 and report.lost == [], describe(report)
    assert report.statuses == {"completed": 199, "failed": 1}, describe(report)
    assert report.generations_by_id[poison] == 2, "the poison request was not attempted exactly K times"
    assert [code for _who, code, _at in exits] == [ENGINE_FAILED_EXIT] * 2, exits
    results = [ResultRecord.model_validate_json(v) for _k, v in await read_topic(cluster.settings,
                                                                                 cluster.topics.results)]
    [failed] = [r for r in results if r.status is Status.FAILED]
    assert failed.request_id == poison and failed.error is not None and failed.error.code == "engine_error"
    dead = [DeadLetter.model_validate_json(v) for _k, v in await read_topic(cluster.settings, cluster.topics.dlq)]
    assert [d.request_id for d in dead] == [poison]
    await eventually(lambda: _all_alive(cluster), timeout=30)
    assert time.monotonic() - started <= FAULT_BUDGET_S


async def _exited(exits: list[tuple[str, int, float]]) -> bool:
    return bool(exits)


async def _all_alive(cluster: Cluster) -> bool:
    return all(p.popen.poll() is None for p in cluster.procs.values())
